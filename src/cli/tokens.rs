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
    let mut p = load(&a.common)?;
    let bad = |m: String| absorb::Error::Tokens(format!("{}: {m}", a.tokens.display()));
    let text = std::fs::read_to_string(&a.tokens).map_err(|e| absorb::Error::Io {
        path: a.tokens.clone(),
        source: e,
    })?;
    let file: TokenFile =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a token file from `absorb encode`: {e}")))?;
    if file.tokens.len() != file.height
        || file.tokens.iter().any(|r| r.len() != file.width)
        || file.height == 0
        || file.width == 0
    {
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
