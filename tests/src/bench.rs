//! What the benchmark binaries share: their `--name VALUE` options and the
//! summary of a series of measurements.

use std::{collections::BTreeMap, str::FromStr};

use anyhow::{Context, Result, bail};

/// The median (the upper one of an even count), minimum and maximum of `v`.
/// NaN entries (runs that were skipped) sort last for the median and are
/// ignored by the minimum and maximum; an empty `v` gives zeros.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (sorted[sorted.len() / 2], min, max)
}

/// A benchmark's options as given: each `--name VALUE`, from a known list.
#[derive(Debug)]
pub struct Flags {
    given: BTreeMap<String, String>,
}

impl Flags {
    /// The process's arguments, each one of `known`: (flag, what its value
    /// is, for the usage line), e.g. `[("--rounds", "N")]`.
    pub fn parse(known: &[(&str, &str)]) -> Result<Self> {
        Self::from_args(std::env::args().skip(1), known)
    }

    /// As `parse`, from `args` (without the program's name).
    pub fn from_args(
        args: impl IntoIterator<Item = String>,
        known: &[(&str, &str)],
    ) -> Result<Self> {
        let usage = known
            .iter()
            .map(|(flag, value)| format!("{flag} {value}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut given = BTreeMap::new();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let Some((flag, value)) = known.iter().find(|(flag, _)| *flag == arg) else {
                bail!("unknown argument {arg:?} ({usage})");
            };
            let v = it
                .next()
                .with_context(|| format!("{flag} {value}: no value"))?;
            given.insert(arg, v);
        }
        Ok(Self { given })
    }

    /// The value of `flag` parsed, or `default` if it wasn't given.
    pub fn get<T>(&self, flag: &str, default: T) -> Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.given.get(flag) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .with_context(|| format!("{flag} {text:?}: not a valid value")),
        }
    }

    /// The text given for `flag`, if any.
    pub fn text(&self, flag: &str) -> Option<String> {
        self.given.get(flag).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    const KNOWN: &[(&str, &str)] = &[("--rounds", "N"), ("--only", "CASE")];

    #[test]
    fn flags_take_their_values_or_defaults() -> Result<()> {
        let f = Flags::from_args(args("--rounds 7 --only new"), KNOWN)?;
        assert_eq!(f.get("--rounds", 5usize)?, 7);
        assert_eq!(f.text("--only").as_deref(), Some("new"));
        let f = Flags::from_args(args(""), KNOWN)?;
        assert_eq!(f.get("--rounds", 5u32)?, 5);
        assert_eq!(f.text("--only"), None);
        Ok(())
    }

    #[test]
    fn unknown_flags_missing_and_bad_values_are_errors() {
        let e = Flags::from_args(args("--round 3"), KNOWN).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown argument \"--round\" (--rounds N, --only CASE)"
        );
        assert!(Flags::from_args(args("--rounds"), KNOWN).is_err());
        let f = Flags::from_args(args("--rounds x"), KNOWN).unwrap();
        assert!(f.get("--rounds", 1usize).is_err());
    }

    #[test]
    fn stats_are_the_upper_median_and_the_range_without_nans() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 3.0, 2.0]), (3.0, 1.0, 4.0));
        assert_eq!(stats(&[2.0, f64::NAN, 1.0]), (2.0, 1.0, 2.0));
        assert_eq!(stats(&[]), (0.0, 0.0, 0.0));
    }
}
