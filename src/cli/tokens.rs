//! `absorb encode` and `absorb decode`: an image to its token grid as JSON, and back.

use anyhow::{bail, Result};

use absorb::image;
use absorb::tokens::TokenFile;
use absorb::{Job, Progress};

use super::args::{DecodeArgs, EncodeArgs};
use super::{load, write_atomic};

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
    let (grid, tokens) = TokenFile::parse(&bytes, p.bundle()).map_err(bad)?;
    let job = Job::decode(p.bundle(), grid, vec![tokens])?;
    let made = p.run(&job, &mut Progress::steps(&mut |_| {}))?;
    let meta = job.metadata(p.bundle(), &p.provider().to_string(), 0, 1);
    image::write_png(&a.out, &made.pixels[0], Some(&meta))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
