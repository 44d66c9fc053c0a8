//! The small textual arguments of the CLI's flags (`--grid 8x16`, `--extend right=32`,
//! `--rect 0,0,8,8`, `--temperature 1.0:0.5`, `--shard 2/8`), parsed into numbers. Ranges are
//! checked where the numbers are used (the [`crate::Job`] builders), as they are for the service.
//! Errors are plain messages: clap prefixes the flag.

/// `T` or `START:END` (a temperature schedule), as `--temperature` takes it.
pub fn parse_temperature(s: &str) -> Result<(f32, Option<f32>), String> {
    let num = |x: &str| {
        x.trim()
            .parse::<f32>()
            .map_err(|_| format!("\"{s}\" is not a number or START:END"))
    };
    match s.split_once(':') {
        Some((a, b)) => Ok((num(a)?, Some(num(b)?))),
        None => Ok((num(s)?, None)),
    }
}

/// `I/M`, as `--shard` takes it.
pub fn parse_shard(s: &str) -> Result<crate::batch::Shard, String> {
    crate::batch::Shard::parse(s).map_err(|e| e.to_string().trim_start_matches("invalid shard: ").to_string())
}

/// `N` (both axes) or `AxB`.
pub fn parse_pair(s: &str) -> Result<[usize; 2], String> {
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("\"{s}\" is not N or AxB (integers)"))
    };
    match s.split_once(['x', 'X']) {
        Some((a, b)) => Ok([num(a)?, num(b)?]),
        None => num(s).map(|n| [n, n]),
    }
}

/// `left=A,right=B,up=C,down=D` (any subset) -> `[left, right, up, down]` in pixels.
pub fn parse_extend(s: &str) -> Result<[usize; 4], String> {
    let mut out = [0usize; 4];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (side, n) = part
            .split_once('=')
            .ok_or_else(|| format!("\"{part}\" is not SIDE=PIXELS (sides: left, right, up, down)"))?;
        let i = ["left", "right", "up", "down"]
            .iter()
            .position(|&k| k == side.trim())
            .ok_or_else(|| format!("\"{side}\" is not a side: use left, right, up or down"))?;
        out[i] = n
            .trim()
            .parse()
            .map_err(|_| format!("\"{n}\" is not a number of pixels"))?;
    }
    if out == [0; 4] {
        return Err("nothing to extend: give e.g. right=32".into());
    }
    Ok(out)
}

/// `x,y,w,h` in pixels, as `--rect` takes it.
pub fn parse_rect(s: &str) -> Result<[usize; 4], String> {
    let parts: Vec<&str> = s.split(',').collect();
    let nums: Result<Vec<usize>, _> = parts.iter().map(|p| p.trim().parse::<usize>()).collect();
    match nums {
        Ok(v) if v.len() == 4 => Ok([v[0], v[1], v[2], v[3]]),
        _ => Err(format!("\"{s}\" is not x,y,w,h (four non-negative integers)")),
    }
}
