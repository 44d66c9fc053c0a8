//! `absorb encode` and `absorb decode`: an image to its token grid as JSON, and back.

use anyhow::{bail, Result};

use absorb::image;
use absorb::{Job, Progress};

use super::args::{DecodeArgs, EncodeArgs};
use super::{load, write_atomic};

/// A token grid as `encode` writes and `decode` reads it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    bundle: String,
    bundle_sha256: String,
    height: usize,
    width: usize,
    tokens: Vec<Vec<i64>>,
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    if let Some(out) = &a.out {
        super::check_out_dir(out)?;
    }
    let mut p = load(&a.common)?;
    let spec = p.bundle().manifest().image.clone();
    let input = image::load_image(&a.image, &spec)?;
    let (tokens, [h, w]) = p.encode(&input)?;
    let file = TokenFile {
        bundle: p.bundle().manifest().name.clone(),
        bundle_sha256: p.bundle().sha256().to_string(),
        height: h,
        width: w,
        tokens: tokens.chunks(w).map(<[i64]>::to_vec).collect(),
    };
    let json = serde_json::to_string_pretty(&file)?;
    match a.out {
        Some(path) => write_atomic(path.as_path(), json.as_bytes())?,
        None => println!("{json}"),
    }
    Ok(())
}

pub fn decode(a: DecodeArgs) -> Result<()> {
    super::check_out_dir(&a.out)?;
    let mut p = load(&a.common)?;
    let bad = |m: String| absorb::Error::Tokens(format!("{}: {m}", a.tokens.display()));
    // The file's size before reading it, its grid before anything is made for it.
    let size = std::fs::metadata(&a.tokens)
        .map_err(|e| bad(format!("cannot read the token file: {e}")))?
        .len();
    let max = absorb::limits::MAX_TOKEN_FILE_BYTES;
    if size > max {
        bail!(bad(format!(
            "{size} bytes is above the limit of {max} bytes for a token file"
        )));
    }
    let bytes = std::fs::read(&a.tokens).map_err(|e| bad(format!("cannot read the token file: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8 text: {e}")))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let file: TokenFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let at = absorb::error::json_key(e.path()).map_or(String::new(), |k| format!(" (at {k})"));
        bad(format!("not a token file from `absorb encode`{at}: {}", e.into_inner()))
    })?;
    let grid = [file.height, file.width];
    absorb::job::check_decode_grid(p.bundle(), grid).map_err(|e| bad(e.to_string()))?;
    if file.tokens.len() != file.height || file.tokens.iter().any(|r| r.len() != file.width) {
        bail!(bad(format!(
            "tokens must be {} rows of {} ids",
            file.height, file.width
        )));
    }
    let job = Job::decode(p.bundle(), [file.height, file.width], vec![file.tokens.concat()])?;
    let made = p.run(&job, &mut Progress::steps(&mut |_| {}))?;
    let meta = job.metadata(p.bundle(), &p.provider().to_string(), 0, 1);
    image::write_png(&a.out, &made.pixels[0], Some(&meta))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
