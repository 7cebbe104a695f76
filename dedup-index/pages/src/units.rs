//! Parsing and printing sizes and rates the way operators write them.

/// Why a size or rate did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a {what}: {why}")]
pub struct UnitError {
    input: String,
    what: &'static str,
    why: &'static str,
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

fn scaled(input: &str, what: &'static str, number: &str, mult: f64) -> Result<u64, UnitError> {
    let err = |why| UnitError {
        input: input.to_owned(),
        what,
        why,
    };
    let n: f64 = number
        .replace('_', "")
        .parse()
        .map_err(|_| err("no number"))?;
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 / 2.0 {
        return Err(err("out of range"));
    }
    Ok(v.round() as u64)
}

/// Parses a byte size: a number with an optional unit, binary (`KiB`, `MiB`,
/// `GiB`, `TiB`, also written `K`, `M`, `G`, `T`) or decimal (`kB`, `MB`,
/// `GB`, `TB`); no unit means bytes. `"256MiB"`, `"1G"`, `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let (num, unit) = split_number(s.trim());
    let mult = match unit {
        "" | "B" => 1.0,
        "K" | "KiB" | "k" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0f64.powi(4),
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => {
            return Err(UnitError {
                input: s.to_owned(),
                what: "size",
                why: "unknown unit (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)",
            });
        }
    };
    scaled(s, "size", num, mult)
}

/// Parses a rate in bits per second: `"1G"`, `"1Gbit"`, `"500Mbit/s"`,
/// `"2.5e9"` is not accepted; units are decimal (`k`, `M`, `G`).
pub fn parse_bits_per_second(s: &str) -> Result<u64, UnitError> {
    let (num, unit) = split_number(s.trim());
    let unit = unit
        .trim_end_matches("/s")
        .trim_end_matches("bit")
        .trim_end_matches("bps");
    let mult = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" | "m" => 1e6,
        "G" | "g" => 1e9,
        _ => {
            return Err(UnitError {
                input: s.to_owned(),
                what: "rate in bits per second",
                why: "unknown unit (use k, M or G, e.g. 1G or 500Mbit)",
            });
        }
    };
    scaled(s, "rate in bits per second", num, mult)
}

/// Prints a byte count with a binary unit: `"1.50 GiB"`, `"4.0 KiB"`, `"12 B"`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_bits_per_second("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bits_per_second("500Mbit/s"), Ok(500_000_000));
        assert_eq!(parse_bits_per_second("10k"), Ok(10_000));
        assert!(parse_bits_per_second("fast").is_err());
    }

    #[test]
    fn printing() {
        assert_eq!(format_bytes(12), "12 B");
        assert_eq!(format_bytes(4096), "4.00 KiB");
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
        assert_eq!(format_bytes(300 << 20), "300 MiB");
    }
}
