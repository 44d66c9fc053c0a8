//! The library's one error type. Every variant carries what a person needs to act on it: the file,
//! the field or graph input, what was expected and what was found, and where possible the fix.
//! The binary wraps these in `anyhow` for context; nothing here knows about exit codes.

use std::path::PathBuf;

use crate::param::Param;

/// Everything that can go wrong in absorb's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No ONNX Runtime library could be found in any of the searched places.
    #[error(
        "no ONNX Runtime library found; looked in:\n{}\nfix: run `make ort` in the repository, \
         `pip install onnxruntime`, or pass --ort-lib /path/to/libonnxruntime.so (or set ORT_DYLIB_PATH)",
        .searched.iter().map(|s| format!("  - {s}")).collect::<Vec<_>>().join("\n")
    )]
    OrtNotFound {
        /// Each place looked at, with why it did not qualify.
        searched: Vec<String>,
    },

    /// A library was found but could not be loaded.
    #[error("could not load ONNX Runtime from {}: {reason}", .path.display())]
    OrtLoad {
        /// The library file.
        path: PathBuf,
        /// The loader's own message.
        reason: String,
    },

    /// The library is older than the API level absorb is compiled against.
    #[error(
        "ONNX Runtime {found} at {} is too old: absorb needs {required} or newer; \
         install a newer build (JetPack 6: jetson-containers' onnxruntime) or pass --ort-lib",
        .path.display()
    )]
    OrtTooOld {
        /// The library file.
        path: PathBuf,
        /// Its version string.
        found: String,
        /// The oldest version absorb can use.
        required: String,
    },

    /// ONNX Runtime was already initialised in this process with different settings.
    #[error("ONNX Runtime is already initialised in this process with {existing}; requested {requested}")]
    OrtReinit {
        /// The settings in force.
        existing: String,
        /// The settings asked for now.
        requested: String,
    },

    /// An error reported by ONNX Runtime itself.
    #[error("{context}: {source}")]
    Ort {
        /// What absorb was doing.
        context: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },

    /// An execution provider was requested explicitly and cannot be used.
    #[error("execution provider {provider} is not usable: {reason}; fix: {fix}")]
    Provider {
        /// The provider's name.
        provider: String,
        /// Why it cannot be used (ONNX Runtime's message where there is one).
        reason: String,
        /// What to do about it.
        fix: String,
    },

    /// `model.json` is unreadable, malformed or inconsistent.
    #[error("{}: {message}", .path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },

    /// A graph file is missing, unreadable or does not match its recorded hash.
    #[error("graph \"{graph}\" ({}): {message}", .path.display())]
    GraphFile {
        /// Which graph (encoder, decoder, transformer).
        graph: &'static str,
        /// The graph file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A graph's inputs or outputs do not match the bundle's contract.
    #[error("graph \"{graph}\" ({}): {message}", .path.display())]
    Contract {
        /// Which graph.
        graph: &'static str,
        /// The graph file.
        path: PathBuf,
        /// Which input/output, expected and found.
        message: String,
    },

    /// A parameter is out of range. Displayed with the parameter's key (`window_margin`); each
    /// edge spells it the way its caller wrote it ([`Param::flag`] on the command line).
    #[error("invalid {param}: {message}")]
    Param {
        /// Which parameter.
        param: Param,
        /// What is allowed and what was given.
        message: String,
    },

    /// An input image or mask is unusable.
    #[error("{}: {message}", .path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A service request body is malformed JSON or has a field of the wrong type.
    #[error("{message}")]
    Request {
        /// The field at fault (`steps`, `extend.left`), or `body` for the document itself.
        field: String,
        /// What is wrong, naming the field.
        message: String,
    },

    /// A token grid is malformed (wrong size, ids out of range).
    #[error("token grid: {0}")]
    Tokens(String),

    /// A broken invariant: a bug in absorb, never the caller's input (exit 1, HTTP 500, logged
    /// with the request id).
    #[error("internal error (a bug in absorb): {0}")]
    Internal(String),

    /// A PNG has no absorb metadata, or metadata this build cannot use.
    #[error("{}: {message}", .path.display())]
    Metadata {
        /// The PNG.
        path: PathBuf,
        /// What is missing or wrong.
        message: String,
    },

    /// A request's handling panicked (a bug): the service answers 500 and goes on.
    #[error("internal error: a panic while {during} ({message}); details in the service log")]
    Panicked {
        /// What was running: "the worker ran requests [3, 4]", "a request handler ran", ...
        during: String,
        /// The panic's message.
        message: String,
    },

    /// The caller stopped the run (a client that went away); nobody reads this error.
    #[error("cancelled: the client went away")]
    Cancelled,

    /// The operating system refused something that is not a file: a thread, a socket, a signal
    /// handler, the async runtime.
    #[error("{what}: {error}")]
    Os {
        /// What absorb was doing: "binding 127.0.0.1:8080", "starting the worker thread".
        what: String,
        /// The OS error.
        error: std::io::Error,
    },

    /// Requests that shared transformer calls with another: the shared run failed (its error
    /// went to the first request and the log).
    #[error("the run this request shared with others failed: {0}")]
    SharedRun(String),

    /// One of the service's bundles cannot be read or loaded: its requests get this, the other
    /// bundles' requests go on.
    #[error("model \"{name}\" cannot be used: {message}")]
    ModelUnavailable {
        /// The bundle's name.
        name: String,
        /// Why (the read or load error).
        message: String,
    },

    /// A file could not be read or written.
    #[error("{}: {error}{}", .path.display(), io_hint(error))]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, not repeated as a source).
        error: std::io::Error,
    },
}

/// What to do about an OS error that has one answer.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            " (the disk is full; files are written whole or not at all, so free space and run the same command again)"
        }
        _ => "",
    }
}

impl Error {
    /// True for errors caused by the caller's input (parameters, images, masks, tokens), as opposed
    /// to the model, the library or the machine. The CLI maps these to exit code 2, the service to 4xx.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            Error::Param { .. }
                | Error::Request { .. }
                | Error::Image { .. }
                | Error::Tokens(_)
                | Error::Metadata { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// A parameter error naming the parameter.
    pub fn param(param: Param, message: impl Into<String>) -> Self {
        Error::Param {
            param,
            message: message.into(),
        }
    }

    pub(crate) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |error| Error::Os { what, error }
    }

    pub(crate) fn ort(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Self {
        let context = context.into();
        move |source| Error::Ort { context, source }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The text of a caught panic's payload (a `&str` or a `String`, as `panic!` makes them).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The JSON key a `serde_path_to_error` failure points at (`tokens.height`, `tokens[3]`), or
/// `None` when it is the document itself.
pub fn json_key(path: &serde_path_to_error::Path) -> Option<String> {
    let key = path.to_string();
    (key != ".").then_some(key)
}
