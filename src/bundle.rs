//! The model bundle: `model.json` plus the three graphs it names (design section 3).
//!
//! This file parses and validates the manifest (unknown fields rejected, every number checked
//! against the others), resolves graph paths inside the bundle directory and verifies their
//! sha256. It does not open the graphs: checking their inputs and outputs against the manifest
//! is `graphs/`'s job, right after ONNX Runtime loads them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::limits;
use crate::param::Param;

/// The only manifest format this build reads.
pub const FORMAT: &str = "absorb-bundle/1";

/// Name of the manifest file inside a bundle directory.
pub const MANIFEST_FILE: &str = "model.json";

/// The cached-attention graph's manifest, beside model.json (export/cache.py).
pub const CACHE_FILE: &str = "cache.json";

/// Format of [`CACHE_FILE`].
pub const CACHE_FORMAT: &str = "absorb-cache/1";

/// A bundle's cached-attention graph (`cache.json`): the graph that computes chosen positions
/// against a cache of every layer's keys and values. Not part of model.json, so a bundle's identity
/// is the same with or without it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CacheGraph {
    /// [`CACHE_FORMAT`].
    pub format: String,
    /// sha256 of the `transformer.onnx` whose weights the graph carries.
    pub transformer_sha256: String,
    /// Transformer layers N.
    pub layers: usize,
    /// Width D of a key or value.
    pub width: usize,
    /// The graph file, relative to the bundle.
    pub file: String,
    /// Its sha256.
    pub sha256: String,
}

/// `model.json`, as written by `export/export.py`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Short name of the model, e.g. `digits`.
    pub name: String,
    /// Pixel space of the encoder input and decoder output.
    pub image: ImageSpec,
    /// The token grid the transformer was trained on.
    pub tokens: TokenSpec,
    /// The three graph files.
    pub graphs: GraphFiles,
    /// The class names of a class-conditional transformer (one more input, `class`); absent for
    /// the paper's unconditional one. Generation without a class takes them in turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// Default sampling settings.
    pub sampling: SamplingDefaults,
    /// Free-form: exporter, opset, source checkpoints, measured metrics.
    #[serde(default)]
    pub provenance: serde_json::Map<String, serde_json::Value>,
}

/// Image tensor layout: `[B, channels, height, width]`, values in `range`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Pixels.
    pub height: usize,
    /// Pixels.
    pub width: usize,
    /// `[low, high]`: the value of a black and a white pixel.
    pub range: [f32; 2],
}

/// The token grid: `height x width` positions, ids `0..codebook_size`, plus the mask id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// Rows of the grid.
    pub height: usize,
    /// Columns of the grid.
    pub width: usize,
    /// Number of VQ codes K; the transformer outputs K logits per position.
    pub codebook_size: usize,
    /// The absorbing state; always equal to `codebook_size` (the embedding's extra last row).
    pub mask_id: i64,
}

impl TokenSpec {
    /// L, the sequence length the transformer sees (row-major grid).
    pub fn len(&self) -> usize {
        self.height * self.width
    }

    /// Never true for a validated manifest.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `graphs` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFiles {
    /// Image -> tokens.
    pub encoder: GraphFile,
    /// Tokens -> image.
    pub decoder: GraphFile,
    /// Tokens -> logits.
    pub transformer: TransformerFile,
}

/// One graph file and its hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    /// File name relative to the bundle directory.
    pub file: String,
    /// Lowercase hex sha256 of the file's bytes.
    pub sha256: String,
}

/// The transformer entry, which may list precision variants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerFile {
    /// File name relative to the bundle directory.
    pub file: String,
    /// Lowercase hex sha256 of the file's bytes.
    pub sha256: String,
    /// Optional precision variants by name (`fp16`, `int8`), each a file with its own hash and
    /// the same inputs and outputs as the fp32 graph.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, GraphFile>,
}

/// The `sampling` section: defaults used when a request does not say.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    /// Number of reverse steps S, 1..=L.
    pub steps: usize,
    /// Softmax temperature, > 0 (of the first step, with `temperature_end`).
    pub temperature: f32,
    /// Temperature of the last step: a linear schedule from `temperature`; absent = constant.
    /// Used only when a request gives no temperature of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_end: Option<f32>,
    /// Nucleus (top-p) truncation in (0, 1] when a request does not give its own; absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Reveal rule when a request does not name one; absent = `absorbing`, the paper's. A bundle
    /// sets it when its own measurements favour another (`python -m export train-digits` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<crate::sampler::SamplerKind>,
    /// The `threshold` sampler's threshold in (0, 1] when a request gives none; read only when
    /// that sampler runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Cached attention by default: a full pass every this many calls (needs the bundle's
    /// `cache.json`); absent = exact mode. A request's `cache` replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<usize>,
    /// Classifier-free guidance scale when a request gives none (a class-conditional bundle's,
    /// without a default cache); absent = none. A request's `guidance` replaces it (0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    /// Variations (`absorb vary`): the share of an image's tokens masked and redone when a
    /// request gives no `strength`, in (0, 1]; absent = [`crate::job::DEFAULT_STRENGTH`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
    /// Window stride `[rows, cols]` for grids larger than the trained one; absent = half a
    /// window. Data that is not stationary (one centred object per image, like digits) wants
    /// the full window: overlapping windows would each ask for an object centred on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_stride: Option<[usize; 2]>,
    /// Window margin `[rows, cols]` (see `absorb generate --window-margin`); absent = an eighth
    /// of a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_margin: Option<[usize; 2]>,
    /// Outpainting: how many token rows/columns of the input, along each side that is extended,
    /// are regenerated with the new area instead of kept; absent = 0 (every input token kept).
    /// The encoder sees nothing beyond the input's border, so its outermost tokens are those of a
    /// crop's border, which the prior continues as another texture next to new area.
    /// `python -m export train` chooses the depth by how well outpainting continues held-out
    /// crops. The input's own pixels are still kept (unless `--decode-all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outpaint_edge: Option<usize>,
}

/// Whether an outpaint edge of `edge` tokens leaves some of an input whose grid is at least the
/// trained `grid` `[h, w]`: less than half its smaller side (no arithmetic on `edge`).
pub fn outpaint_edge_fits(edge: usize, grid: [usize; 2]) -> bool {
    edge < grid[0].min(grid[1]).div_ceil(2)
}

/// The three graphs of a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    /// Image -> tokens (quantizer argmin inside).
    Encoder,
    /// Tokens -> image (codebook gather inside).
    Decoder,
    /// Tokens -> logits.
    Transformer,
}

impl GraphKind {
    /// All three, in load order.
    pub const ALL: [GraphKind; 3] = [GraphKind::Encoder, GraphKind::Decoder, GraphKind::Transformer];

    /// The name used in `model.json`, logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            GraphKind::Encoder => "encoder",
            GraphKind::Decoder => "decoder",
            GraphKind::Transformer => "transformer",
        }
    }
}

/// A validated bundle on disk.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    manifest_sha256: String,
    variant: Option<String>,
    /// The cached-attention graph, read and checked on first use (its file can be large).
    cache: std::sync::Arc<std::sync::OnceLock<std::result::Result<CacheGraph, String>>>,
}

impl Bundle {
    /// Reads `DIR/model.json`, validates it and checks every graph file's presence and sha256.
    pub fn load(dir: &Path) -> Result<Bundle> {
        Bundle::load_variant(dir, None)
    }

    /// [`Bundle::load`], with the transformer replaced by the named precision variant (`int8`,
    /// `fp16`) from `graphs.transformer.variants`.
    pub fn load_variant(dir: &Path, variant: Option<&str>) -> Result<Bundle> {
        let (manifest, bytes) = read_manifest(dir)?;
        let mut manifest = manifest;
        let mut manifest_sha256 = sha256_hex(&bytes);
        if let Some(name) = variant {
            let t = &mut manifest.graphs.transformer;
            let Some(v) = t.variants.get(name).cloned() else {
                let have: Vec<&String> = t.variants.keys().collect();
                return Err(Error::param(
                    Param::Variant,
                    format!("the bundle has no transformer variant \"{name}\"; it has {have:?} (add one with export/)"),
                ));
            };
            t.file = v.file;
            t.sha256 = v.sha256;
            // The variant changes the tokens: name it in the identity recorded in PNG metadata.
            manifest_sha256 = sha256_hex(format!("{manifest_sha256}+{name}").as_bytes());
        }
        let bundle = Bundle {
            dir: dir.to_path_buf(),
            manifest,
            manifest_sha256,
            variant: variant.map(str::to_string),
            cache: Default::default(),
        };
        for kind in GraphKind::ALL {
            bundle.verify_graph(kind)?;
        }
        Ok(bundle)
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The transformer variant in use, if not the fp32 graph.
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// sha256 of `model.json`'s bytes; since the manifest holds every graph's hash, this names
    /// the whole bundle. With a variant, the hash of that and the variant's name. Recorded in PNG
    /// metadata.
    pub fn sha256(&self) -> &str {
        &self.manifest_sha256
    }

    /// The cached-attention graph ([`CACHE_FILE`]) and its path, checked: present, of this format,
    /// made from this bundle's transformer, the file's sha256 as recorded, its shape plausible.
    /// Read once per bundle. Errors name what is wrong (a bundle without one: how to add it).
    pub fn cache_graph(&self) -> Result<(CacheGraph, PathBuf)> {
        if let Some(v) = &self.variant {
            return Err(Error::param(
                Param::Cache,
                format!("cached attention runs the fp32 transformer, not the {v} variant: leave out --variant or use --cache off"),
            ));
        }
        let path = self.dir.join(CACHE_FILE);
        let checked = self.cache.get_or_init(|| self.read_cache_graph());
        match checked {
            Ok(c) => Ok((c.clone(), self.dir.join(&c.file))),
            Err(m) if !path.exists() => Err(Error::param(Param::Cache, m.clone())),
            Err(m) => Err(Error::GraphFile {
                graph: "cached transformer",
                path,
                message: m.clone(),
            }),
        }
    }

    fn read_cache_graph(&self) -> std::result::Result<CacheGraph, String> {
        let path = self.dir.join(CACHE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "the bundle {} has no cached-attention graph ({CACHE_FILE}): add it with                      `python -m export cache --bundle {}`, or use --cache off",
                    self.manifest.name,
                    self.dir.display()
                ))
            }
            Err(e) => return Err(format!("cannot read it: {e}")),
        };
        let c: CacheGraph = serde_json::from_slice(&bytes).map_err(|e| format!("not a cache manifest: {e}"))?;
        if c.format != CACHE_FORMAT {
            return Err(format!(
                "format is \"{}\", this build reads \"{CACHE_FORMAT}\"",
                c.format
            ));
        }
        if c.transformer_sha256 != self.manifest.graphs.transformer.sha256 {
            return Err(format!(
                "it was made from another transformer (sha256 {}, the bundle's is {}): make it again with                  `python -m export cache --bundle DIR`",
                c.transformer_sha256, self.manifest.graphs.transformer.sha256
            ));
        }
        if !(1..=4096).contains(&c.layers) || !(1..=1 << 16).contains(&c.width) {
            return Err(format!(
                "layers {} and width {} are not a transformer's",
                c.layers, c.width
            ));
        }
        if c.file.contains('/') || c.file.contains('\\') || c.file.starts_with('.') {
            return Err(format!(
                "file \"{}\" must be a plain name in the bundle directory",
                c.file
            ));
        }
        let graph = self.dir.join(&c.file);
        let found = fs::read(&graph)
            .map(|b| sha256_hex(&b))
            .map_err(|e| format!("cannot read {}: {e}", graph.display()))?;
        if found != c.sha256 {
            return Err(format!(
                "{}'s sha256 is {found}, {CACHE_FILE} records {}: the file was changed or truncated",
                c.file, c.sha256
            ));
        }
        Ok(c)
    }

    /// Path of a graph file.
    pub fn graph_path(&self, kind: GraphKind) -> PathBuf {
        let g = &self.manifest.graphs;
        let file = match kind {
            GraphKind::Encoder => &g.encoder.file,
            GraphKind::Decoder => &g.decoder.file,
            GraphKind::Transformer => &g.transformer.file,
        };
        self.dir.join(file)
    }

    fn verify_graph(&self, kind: GraphKind) -> Result<()> {
        let g = &self.manifest.graphs;
        let expected = match kind {
            GraphKind::Encoder => &g.encoder.sha256,
            GraphKind::Decoder => &g.decoder.sha256,
            GraphKind::Transformer => &g.transformer.sha256,
        };
        let path = self.graph_path(kind);
        let bytes = fs::read(&path).map_err(|e| Error::GraphFile {
            graph: kind.name(),
            path: path.clone(),
            message: format!("cannot read the file named in {MANIFEST_FILE}: {e}"),
        })?;
        let found = sha256_hex(&bytes);
        if &found != expected {
            return Err(Error::GraphFile {
                graph: kind.name(),
                path,
                message: format!(
                    "sha256 is {found}, {MANIFEST_FILE} records {expected}: the file was changed or \
                     truncated; re-export the bundle or restore the file"
                ),
            });
        }
        Ok(())
    }
}

/// Lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks every number against the others. Returns a message naming the field.
/// Reads and validates `DIR/model.json` without touching the graph files (no hashing: cheap even
/// for a paper-size bundle). Returns the manifest and the file's bytes.
pub fn read_manifest(dir: &Path) -> Result<(Manifest, Vec<u8>)> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "no {MANIFEST_FILE} here: is {} a bundle directory (models/<name>/)?",
                dir.display()
            )
        } else {
            e.to_string()
        };
        Error::Manifest {
            path: path.clone(),
            message: hint,
        }
    })?;
    let manifest = parse_manifest(&bytes, &path)?;
    Ok((manifest, bytes))
}

/// Parses and validates the bytes of a `model.json` (`path` names it in errors).
pub fn parse_manifest(bytes: &[u8], path: &Path) -> Result<Manifest> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let manifest: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
        // The key at fault (`tokens.height`), then serde's own message with line and column.
        let key = crate::error::json_key(e.path()).map_or(String::new(), |k| format!(" at {k}"));
        Error::Manifest {
            path: path.to_path_buf(),
            message: format!("not a valid bundle manifest{key}: {}", e.into_inner()),
        }
    })?;
    validate(&manifest).map_err(|message| Error::Manifest {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(manifest)
}

fn validate(m: &Manifest) -> Result<(), String> {
    if m.format != FORMAT {
        return Err(format!(
            "format is \"{}\", this build of absorb reads \"{FORMAT}\"; re-export with export/",
            m.format
        ));
    }
    if m.name.trim().is_empty() {
        return Err("name is empty".into());
    }
    let i = &m.image;
    if i.channels != 1 && i.channels != 3 {
        return Err(format!("image.channels is {}, expected 1 or 3", i.channels));
    }
    let max = crate::limits::MAX_IMAGE_SIDE;
    if i.height == 0 || i.width == 0 || i.height > max || i.width > max {
        return Err(format!(
            "image size is {}x{} (height x width), must be 1..={max} pixels per side",
            i.height, i.width
        ));
    }
    let [lo, hi] = i.range;
    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
        return Err(format!(
            "image.range is [{lo}, {hi}], expected two finite numbers low < high"
        ));
    }
    let t = &m.tokens;
    if t.height == 0 || t.width == 0 {
        return Err(format!("tokens grid is {}x{}, must be positive", t.height, t.width));
    }
    if i.height % t.height != 0 || i.width % t.width != 0 || i.height / t.height != i.width / t.width {
        return Err(format!(
            "image {}x{} is not an integer multiple (same factor both ways) of the tokens grid {}x{}",
            i.height, i.width, t.height, t.width
        ));
    }
    if !(2..=limits::MAX_CODEBOOK).contains(&t.codebook_size) {
        return Err(format!(
            "tokens.codebook_size is {}, must be 2..={}",
            t.codebook_size,
            limits::MAX_CODEBOOK
        ));
    }
    if t.mask_id != t.codebook_size as i64 {
        return Err(format!(
            "tokens.mask_id is {} but must equal tokens.codebook_size ({}): the transformer's \
             embedding has codebook_size + 1 rows with the mask last",
            t.mask_id, t.codebook_size
        ));
    }
    let l = t.len();
    let s = &m.sampling;
    if s.steps == 0 || s.steps > l {
        return Err(format!(
            "sampling.steps is {}, must be in 1..={l} (the number of tokens)",
            s.steps
        ));
    }
    for (name, t) in [
        ("temperature", Some(s.temperature)),
        ("temperature_end", s.temperature_end),
    ] {
        if let Some(t) = t.filter(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(format!("sampling.{name} is {t}, must be a finite number > 0"));
        }
    }
    for (name, p) in [("top_p", s.top_p), ("threshold", s.threshold), ("strength", s.strength)] {
        if let Some(p) = p.filter(|p| !(p.is_finite() && *p > 0.0 && *p <= 1.0)) {
            return Err(format!("sampling.{name} is {p}, must be a number > 0 and <= 1"));
        }
    }
    if let Some(g) = s.guidance {
        if !(g.is_finite() && (0.0..=crate::limits::MAX_GUIDANCE).contains(&g)) {
            return Err(format!(
                "sampling.guidance is {g}, must be a number >= 0 and <= {}",
                crate::limits::MAX_GUIDANCE
            ));
        }
        if m.classes.is_none() {
            return Err(
                "sampling.guidance is set but the model lists no classes: guidance needs a \
                        class-conditional model"
                    .to_string(),
            );
        }
        if s.cache.is_some() {
            return Err(
                "sampling.guidance and sampling.cache are both set: cached attention does not guide".to_string(),
            );
        }
    }
    let margin = s.window_margin.unwrap_or([0, 0]);
    if let Some([mh, mw]) = s.window_margin {
        if mh >= t.height.div_ceil(2) || mw >= t.width.div_ceil(2) {
            return Err(format!(
                "sampling.window_margin is [{mh}, {mw}], each must be less than half the tokens grid {}x{}",
                t.height, t.width
            ));
        }
    }
    if let Some([sh, sw]) = s.window_stride {
        if sh == 0 || sw == 0 || sh > t.height - 2 * margin[0] || sw > t.width - 2 * margin[1] {
            return Err(format!(
                "sampling.window_stride is [{sh}, {sw}], must be 1..= the tokens grid {}x{} minus twice the margin",
                t.height, t.width
            ));
        }
    }
    if let Some(e) = s.outpaint_edge {
        if !outpaint_edge_fits(e, [t.height, t.width]) {
            return Err(format!(
                "sampling.outpaint_edge is {e}, must be less than half the tokens grid {}x{} \
                 (some of an input's tokens must stay)",
                t.height, t.width
            ));
        }
    }
    if let Some(names) = &m.classes {
        if names.is_empty() || names.len() > limits::MAX_CLASSES {
            return Err(format!(
                "classes lists {} names, must be 1..={} (leave it out for an unconditional model)",
                names.len(),
                limits::MAX_CLASSES
            ));
        }
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() || name.chars().count() > 64 || name.chars().any(|c| c.is_control()) {
                return Err(format!(
                    "classes[{i}] is {name:?}: a name is 1-64 characters, none a control character"
                ));
            }
            if names[..i].contains(name) {
                return Err(format!("classes[{i}] is {name:?}, which is listed twice"));
            }
        }
    }
    let g = &m.graphs;
    let files = [
        ("graphs.encoder", &g.encoder.file, &g.encoder.sha256),
        ("graphs.decoder", &g.decoder.file, &g.decoder.sha256),
        ("graphs.transformer", &g.transformer.file, &g.transformer.sha256),
    ];
    for (field, file, sha) in files {
        check_file_name(field, file)?;
        check_sha(field, sha)?;
    }
    for (name, v) in &g.transformer.variants {
        let field = format!("graphs.transformer.variants.{name}");
        check_file_name(&field, &v.file)?;
        check_sha(&field, &v.sha256)?;
    }
    Ok(())
}

impl Manifest {
    /// The trained token grid `[h, w]`.
    pub fn grid(&self) -> [usize; 2] {
        [self.tokens.height, self.tokens.width]
    }

    /// The token space of the trained grid, as the sampler needs it.
    pub fn token_space(&self) -> crate::sampler::TokenSpace {
        crate::sampler::TokenSpace {
            len: self.tokens.len(),
            width: self.tokens.width,
            codebook_size: self.tokens.codebook_size,
            mask_id: self.tokens.mask_id,
        }
    }

    /// Pixels per token `[rows, cols]`.
    pub fn token_pixels(&self) -> [usize; 2] {
        [
            self.image.height / self.tokens.height,
            self.image.width / self.tokens.width,
        ]
    }

    /// Largest grid side in tokens `[rows, cols]`: [`limits::MAX_GRID_SIDE`] tokens and
    /// [`limits::MAX_IMAGE_SIDE`] pixels, whichever is smaller.
    pub fn max_grid_side(&self) -> [usize; 2] {
        let f = self.token_pixels();
        [0, 1].map(|a| limits::MAX_GRID_SIDE.min(limits::MAX_IMAGE_SIDE / f[a]))
    }

    /// Classes of the transformer (0: unconditional).
    pub fn class_count(&self) -> usize {
        self.classes.as_ref().map_or(0, Vec::len)
    }

    /// The class a request names: one of `classes` by name, else by index; an error saying
    /// which there are when the model has no such class.
    pub fn class_index(&self, given: &str) -> std::result::Result<usize, String> {
        let Some(names) = &self.classes else {
            return Err(format!(
                "this model ({}) is not class-conditional: it takes no class",
                self.name
            ));
        };
        if let Some(i) = names.iter().position(|n| n == given) {
            return Ok(i);
        }
        match given.parse::<usize>() {
            Ok(i) if i < names.len() => Ok(i),
            _ => {
                let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
                let more = if names.len() > 20 { ", ..." } else { "" };
                Err(format!(
                    "{given:?} is not a class of this model: one of {}{more} (or its index 0..{})",
                    shown.join(", "),
                    names.len()
                ))
            }
        }
    }
}

fn check_sha(field: &str, sha: &str) -> Result<(), String> {
    if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("{field}.sha256 is \"{sha}\", expected 64 lowercase hex digits"))
    }
}

/// Graph files must stay inside the bundle: a plain relative name, no `..`, no absolute path.
fn check_file_name(field: &str, file: &str) -> Result<(), String> {
    let p = Path::new(file);
    let plain = !file.is_empty() && p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(format!(
            "{field}.file is \"{file}\": must be a relative path inside the bundle directory"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format": "absorb-bundle/1",
            "name": "t",
            "image": {"channels": 1, "height": 32, "width": 32, "range": [0.0, 1.0]},
            "tokens": {"height": 8, "width": 8, "codebook_size": 64, "mask_id": 64},
            "graphs": {
                "encoder": {"file": "encoder.onnx", "sha256": "0".repeat(64)},
                "decoder": {"file": "decoder.onnx", "sha256": "0".repeat(64)},
                "transformer": {"file": "transformer.onnx", "sha256": "0".repeat(64)}
            },
            "sampling": {"steps": 16, "temperature": 1.0},
            "provenance": {"anything": [1, 2]}
        }))
        .unwrap()
    }

    #[test]
    fn a_consistent_manifest_validates() {
        validate(&manifest()).unwrap();
    }

    #[test]
    fn a_wrong_mask_id_is_rejected_naming_the_field() {
        let mut m = manifest();
        m.tokens.mask_id = 63;
        let e = validate(&m).unwrap_err();
        assert!(e.contains("tokens.mask_id is 63"), "{e}");
    }

    #[test]
    fn steps_above_the_token_count_are_rejected() {
        let mut m = manifest();
        m.sampling.steps = 65;
        assert!(validate(&m).unwrap_err().contains("sampling.steps is 65"));
    }

    #[test]
    fn a_grid_that_does_not_divide_the_image_is_rejected() {
        let mut m = manifest();
        m.tokens.width = 5;
        assert!(validate(&m).unwrap_err().contains("not an integer multiple"));
    }

    #[test]
    fn graph_files_outside_the_bundle_are_rejected() {
        for bad in ["../x.onnx", "/etc/passwd", ""] {
            let mut m = manifest();
            m.graphs.decoder.file = bad.into();
            assert!(validate(&m).unwrap_err().contains("graphs.decoder.file"), "{bad}");
        }
    }

    #[test]
    fn variants_need_a_plain_file_name_and_a_hash() {
        let mut m = manifest();
        let v = GraphFile {
            file: "transformer.int8.onnx".into(),
            sha256: "1".repeat(64),
        };
        m.graphs.transformer.variants.insert("int8".into(), v.clone());
        validate(&m).unwrap();
        m.graphs.transformer.variants.insert(
            "fp16".into(),
            GraphFile {
                sha256: "xyz".into(),
                ..v
            },
        );
        assert!(validate(&m)
            .unwrap_err()
            .contains("graphs.transformer.variants.fp16.sha256"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut v = serde_json::to_value(manifest()).unwrap();
        v["tokens"]["extra"] = 1.into();
        let e = serde_json::from_value::<Manifest>(v).unwrap_err().to_string();
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn a_bundle_may_name_its_default_sampler_and_temperature_schedule() {
        let mut j = serde_json::to_value(manifest()).unwrap();
        j["sampling"]["sampler"] = "maskgit".into();
        j["sampling"]["temperature_end"] = 0.5.into();
        let parse = |j: &serde_json::Value| parse_manifest(j.to_string().as_bytes(), Path::new("model.json"));
        let m = parse(&j).unwrap();
        assert_eq!(m.sampling.sampler, Some(crate::sampler::SamplerKind::Maskgit));
        assert_eq!(m.sampling.temperature_end, Some(0.5));
        j["sampling"]["sampler"] = "greedy".into();
        let e = parse(&j).unwrap_err().to_string();
        assert!(e.contains("sampling.sampler") && e.contains("greedy"), "{e}");
        j["sampling"]["sampler"] = "even".into();
        j["sampling"]["temperature_end"] = (-1.0).into();
        let e = parse(&j).unwrap_err().to_string();
        assert!(e.contains("sampling.temperature_end is -1"), "{e}");
    }

    #[test]
    fn outpaint_edge_must_leave_some_of_the_input() {
        let mut j = serde_json::to_value(manifest()).unwrap();
        let parse = |j: &serde_json::Value| parse_manifest(j.to_string().as_bytes(), Path::new("model.json"));
        assert_eq!(parse(&j).unwrap().sampling.outpaint_edge, None);
        let side = j["tokens"]["height"]
            .as_u64()
            .unwrap()
            .min(j["tokens"]["width"].as_u64().unwrap());
        j["sampling"]["outpaint_edge"] = (side / 2 - 1).into();
        assert_eq!(parse(&j).unwrap().sampling.outpaint_edge, Some((side / 2 - 1) as usize));
        j["sampling"]["outpaint_edge"] = (side / 2).into();
        let e = parse(&j).unwrap_err().to_string();
        assert!(e.contains("sampling.outpaint_edge"), "{e}");
        j["sampling"]["outpaint_edge"] = u64::MAX.into();
        let e = parse(&j).unwrap_err().to_string();
        assert!(e.contains("sampling.outpaint_edge"), "{e}");
        j["sampling"]["outpaint_edge"] = (-1).into();
        assert!(parse(&j).is_err());
    }

    #[test]
    fn classes_are_optional_named_once_each_and_looked_up_by_name_or_index() {
        let mut j = serde_json::to_value(manifest()).unwrap();
        let parse = |j: &serde_json::Value| parse_manifest(j.to_string().as_bytes(), Path::new("model.json"));
        let m = parse(&j).unwrap();
        assert_eq!(m.class_count(), 0);
        assert!(m.class_index("3").unwrap_err().contains("not class-conditional"));
        j["classes"] = serde_json::json!(["cat", "dog", "7"]);
        let m = parse(&j).unwrap();
        assert_eq!(m.class_count(), 3);
        assert_eq!(m.class_index("dog"), Ok(1));
        assert_eq!(m.class_index("7"), Ok(2), "a name wins over an index");
        assert_eq!(m.class_index("0"), Ok(0));
        let e = m.class_index("3").unwrap_err();
        assert!(e.contains("cat, dog, 7") && e.contains("0..3"), "{e}");
        for (bad, says) in [
            (serde_json::json!([]), "0 names"),
            (serde_json::json!(["a", "a"]), "listed twice"),
            (serde_json::json!(["a", ""]), "classes[1]"),
            (serde_json::json!(["a\nb"]), "control"),
        ] {
            j["classes"] = bad;
            let e = parse(&j).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_default_guidance_needs_classes_no_default_cache_and_a_sane_scale() {
        let mut j = serde_json::to_value(manifest()).unwrap();
        let parse = |j: &serde_json::Value| parse_manifest(j.to_string().as_bytes(), Path::new("model.json"));
        j["sampling"]["guidance"] = 2.0.into();
        let e = parse(&j).unwrap_err().to_string();
        assert!(e.contains("sampling.guidance") && e.contains("no classes"), "{e}");
        j["classes"] = serde_json::json!(["cat", "dog"]);
        assert_eq!(parse(&j).unwrap().sampling.guidance, Some(2.0));
        j["sampling"]["cache"] = 4.into();
        let e = parse(&j).unwrap_err().to_string();
        assert!(e.contains("sampling.guidance and sampling.cache"), "{e}");
        j["sampling"].as_object_mut().unwrap().remove("cache");
        for bad in [-1.0, 1000.0] {
            j["sampling"]["guidance"] = bad.into();
            let e = parse(&j).unwrap_err().to_string();
            assert!(e.contains("sampling.guidance is"), "{e}");
        }
    }

    #[test]
    fn temperature_must_be_positive_and_finite() {
        for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let mut m = manifest();
            m.sampling.temperature = t;
            assert!(validate(&m).unwrap_err().contains("sampling.temperature"));
        }
    }
}
