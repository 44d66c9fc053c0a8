//! The token file `absorb encode` writes and `absorb decode` reads: a bundle's token grid as JSON.

use crate::Bundle;

/// A token grid as `encode` writes and `decode` reads it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// The bundle's name.
    pub bundle: String,
    /// The bundle's identity ([`Bundle::sha256`]).
    pub bundle_sha256: String,
    /// Grid rows.
    pub height: usize,
    /// Grid columns.
    pub width: usize,
    /// `height` rows of `width` code ids.
    pub tokens: Vec<Vec<i64>>,
}

impl TokenFile {
    /// Parses a token file and checks its grid against `bundle` (sizes and shape; the ids are
    /// checked by [`crate::Job::decode`]). Returns the grid `[rows, cols]` and the ids row by row.
    /// The message names what is wrong; the caller adds the file's name.
    pub fn parse(bytes: &[u8], bundle: &Bundle) -> Result<([usize; 2], Vec<i64>), String> {
        let max = crate::limits::MAX_TOKEN_FILE_BYTES;
        if bytes.len() as u64 > max {
            return Err(format!(
                "{} bytes is above the limit of {max} bytes for a token file",
                bytes.len()
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
        let de = &mut serde_json::Deserializer::from_str(text);
        let file: TokenFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = crate::error::json_key(e.path()).map_or(String::new(), |k| format!(" (at {k})"));
            format!("not a token file from `absorb encode`{at}: {}", e.into_inner())
        })?;
        let grid = [file.height, file.width];
        crate::job::check_decode_grid(bundle, grid).map_err(|e| e.to_string())?;
        if file.tokens.len() != file.height || file.tokens.iter().any(|r| r.len() != file.width) {
            return Err(format!("tokens must be {} rows of {} ids", file.height, file.width));
        }
        Ok((grid, file.tokens.concat()))
    }
}
