//! What the soak found: failures sorted into the flood's window, the
//! restarts' windows and the rest; the agent's memory and the flow tables'
//! occupancy over time, and whether they stayed flat; the verdict.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::{Value, json};

use super::traffic::{Failure, Kind};

/// A stretch of time in which failures are expected and counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    /// The SYN flood, and a few seconds after it.
    Flood,
    /// From a `kill -9` of the agent until a few seconds after the next one
    /// is ready.
    Restart,
}

#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub kind: WindowKind,
    /// Seconds since the start.
    pub from: f64,
    pub to: f64,
}

impl Window {
    fn overlaps(&self, f: &Failure) -> bool {
        f.from <= self.to && f.to >= self.from
    }
}

/// One reading of the agent, every `sample_every`.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the start.
    pub at: f64,
    /// Which agent (1 = the first, +1 at each restart).
    pub life: usize,
    pub rss_kib: u64,
    pub fds: u64,
    /// `sluice_conntrack_entries`.
    pub conntrack: f64,
    /// `sluice_conntrack_half_open_entries`.
    pub half_open: f64,
}

/// An agent restart: when it was killed, and when the next was ready.
#[derive(Clone, Debug)]
pub struct Restart {
    pub killed_at: f64,
    pub ready_at: f64,
}

/// The flood burst.
#[derive(Clone, Debug, Default)]
pub struct Flood {
    pub from: f64,
    pub to: f64,
    pub sent: u64,
    /// The tables right after it (from /metrics).
    pub conntrack_after: f64,
    pub half_open_after: f64,
    pub over_budget: f64,
}

/// Everything the soak saw, as the engine hands it over.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub seconds: f64,
    pub warm_up: f64,
    pub interrupted: bool,
    pub attempts: BTreeMap<Kind, u64>,
    pub failures: Vec<Failure>,
    pub windows: Vec<Window>,
    pub samples: Vec<Sample>,
    pub restarts: Vec<Restart>,
    pub config_changes: Vec<(f64, String)>,
    pub dns_changes: Vec<(f64, String)>,
    pub flood: Option<Flood>,
    /// Things that went wrong that are not a client's failure: churn the
    /// agent did not apply, a restart that did not adopt the datapath.
    pub problems: Vec<String>,
}

/// How long after a flood the samples say nothing about growth: its
/// half-open entries live for `tcp_syn_sent` (60 s) until the sweep (every
/// 2 s) removes them.
const FLOOD_AFTERMATH: f64 = 65.0;
/// The stretch at the start (after warm-up) and at the end that is compared.
const MINUTE: f64 = 60.0;
/// Flat: the end's median is at most this times the start's median…
const GROWTH_FACTOR: f64 = 1.2;

/// A stretch of the soak over which a series is judged: its first minute
/// against its last.
#[derive(Clone, Debug)]
pub struct Segment {
    pub label: &'static str,
    pub from: f64,
    pub to: f64,
    /// The median of the segment's first minute.
    pub start_median: Option<f64>,
    /// The median of its last minute.
    pub end_median: Option<f64>,
    /// The most the end's median may be: `GROWTH_FACTOR` × the start's, plus
    /// the series' slack (a count this small is noise, not growth).
    pub limit: Option<f64>,
    /// None: too short to judge (its first and last minutes overlap, or
    /// have no sample).
    pub flat: Option<bool>,
}

/// One series' summary over the soak, and whether it stayed flat.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: &'static str,
    pub unit: &'static str,
    pub first: f64,
    pub last: f64,
    pub min: f64,
    pub max: f64,
    /// After warm-up until the flood, and from the end of its aftermath to
    /// the end (or, without a flood, the whole run after warm-up).
    pub segments: Vec<Segment>,
    /// The flood's step: the first minute after its aftermath against the
    /// last minute before it (what the flood left behind, shown).
    pub flood_step: Option<f64>,
    /// Every judged segment flat; None: none could be judged.
    pub flat: Option<bool>,
    /// Judged (a series shown for information only is not).
    pub judged: bool,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

impl Observed {
    fn in_flood_aftermath(&self, at: f64) -> bool {
        self.flood
            .as_ref()
            .is_some_and(|f| at >= f.from && at <= f.to + FLOOD_AFTERMATH)
    }

    /// The stretches growth is judged over: a flood fills the half-open
    /// table and the agent that sweeps it keeps the memory it took (its
    /// high-water mark, bounded by the table's size), so the flood is a
    /// step to show, not growth; what comes before it and after its
    /// aftermath must each be flat.
    fn segments(&self) -> Vec<(&'static str, f64, f64)> {
        let end = self.samples.last().map_or(0.0, |s| s.at);
        match &self.flood {
            Some(f) => vec![
                ("before the flood", self.warm_up, f.from),
                ("after the flood", f.to + FLOOD_AFTERMATH, end),
            ],
            None => vec![("whole run", self.warm_up, end)],
        }
    }

    fn series(
        &self,
        name: &'static str,
        unit: &'static str,
        slack: f64,
        judged: bool,
        value: impl Fn(&Sample) -> f64,
    ) -> Series {
        let all: Vec<f64> = self.samples.iter().map(&value).collect();
        let clean = |from: f64, to: f64| -> Vec<f64> {
            self.samples
                .iter()
                .filter(|s| s.at >= from && s.at <= to && !self.in_flood_aftermath(s.at))
                .map(&value)
                .collect()
        };
        let segments: Vec<Segment> = self
            .segments()
            .into_iter()
            .map(|(label, from, to)| {
                let start_median = median(clean(from, from + MINUTE));
                // Its last minute, if that begins after the first one ends.
                let end_median = if to - MINUTE >= from + MINUTE {
                    median(clean(to - MINUTE, to))
                } else {
                    None
                };
                let limit = start_median.map(|m| m * GROWTH_FACTOR + slack);
                let flat = match (end_median, limit) {
                    (Some(e), Some(l)) => Some(e <= l),
                    _ => None,
                };
                Segment {
                    label,
                    from,
                    to,
                    start_median,
                    end_median,
                    limit,
                    flat,
                }
            })
            .collect();
        let flood_step = match (segments.first(), segments.get(1)) {
            (Some(before), Some(after)) if self.flood.is_some() => {
                let before = median(clean(before.to - MINUTE, before.to));
                let after = median(clean(after.from, after.from + MINUTE));
                before.zip(after).map(|(b, a)| a - b)
            }
            _ => None,
        };
        let verdicts: Vec<bool> = segments.iter().filter_map(|s| s.flat).collect();
        Series {
            name,
            unit,
            first: all.first().copied().unwrap_or(0.0),
            last: all.last().copied().unwrap_or(0.0),
            min: all.iter().copied().fold(f64::INFINITY, f64::min),
            max: all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            segments,
            flood_step,
            flat: (!verdicts.is_empty()).then(|| verdicts.iter().all(|&f| f)),
            judged,
        }
    }

    /// The series the soak follows: the agent's RSS and the flow tables'
    /// occupancy (judged), and its open descriptors (shown).
    pub fn all_series(&self) -> Vec<Series> {
        vec![
            self.series("agent RSS", "KiB", 4096.0, true, |s| s.rss_kib as f64),
            self.series("sluice_conntrack_entries", "", 64.0, true, |s| s.conntrack),
            self.series("sluice_conntrack_half_open_entries", "", 64.0, true, |s| {
                s.half_open
            }),
            self.series("agent open descriptors", "", 16.0, false, |s| s.fds as f64),
        ]
    }

    /// Which window a failure falls in (the flood's first).
    pub fn window_of(&self, f: &Failure) -> Option<WindowKind> {
        let hit = |kind| self.windows.iter().any(|w| w.kind == kind && w.overlaps(f));
        if hit(WindowKind::Flood) {
            Some(WindowKind::Flood)
        } else if hit(WindowKind::Restart) {
            Some(WindowKind::Restart)
        } else {
            None
        }
    }

    /// Per kind: (attempts, failed, in the flood, in a restart, outside).
    pub fn by_kind(&self) -> BTreeMap<Kind, [u64; 5]> {
        let mut out: BTreeMap<Kind, [u64; 5]> = BTreeMap::new();
        for (kind, n) in &self.attempts {
            out.entry(kind).or_default()[0] = *n;
        }
        for f in &self.failures {
            let row = out.entry(f.kind).or_default();
            row[1] += 1;
            match self.window_of(f) {
                Some(WindowKind::Flood) => row[2] += 1,
                Some(WindowKind::Restart) => row[3] += 1,
                None => row[4] += 1,
            }
        }
        out
    }

    /// Failures outside the flood and the restarts.
    pub fn failures_outside(&self) -> Vec<&Failure> {
        self.failures
            .iter()
            .filter(|f| self.window_of(f).is_none())
            .collect()
    }

    /// What makes the soak fail: failures outside the windows, a judged
    /// series that grew, a problem, an interruption. Empty: passed.
    pub fn verdict(&self) -> Vec<String> {
        let mut why = Vec::new();
        let outside = self.failures_outside().len();
        if outside > 0 {
            why.push(format!(
                "{outside} failed connections outside the flood and restart windows"
            ));
        }
        for s in self.all_series().iter().filter(|s| s.judged) {
            for g in s.segments.iter().filter(|g| g.flat == Some(false)) {
                why.push(format!(
                    "{} grew {}: the last minute's median {:.0} > {:.0} (1.2 × the first minute's {:.0}, plus slack)",
                    s.name,
                    g.label,
                    g.end_median.unwrap_or(0.0),
                    g.limit.unwrap_or(0.0),
                    g.start_median.unwrap_or(0.0)
                ));
            }
        }
        why.extend(self.problems.iter().cloned());
        if self.interrupted {
            why.push("interrupted before the end".into());
        }
        why
    }

    /// The printed summary.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        let total: u64 = self.attempts.values().sum();
        let _ = writeln!(
            o,
            "\nsoak: {:.0} s ({:.1} min), {total} connections and checks, {} agent restarts (kill -9), \
             {} config changes, {} DNS changes",
            self.seconds,
            self.seconds / 60.0,
            self.restarts.len(),
            self.config_changes.len(),
            self.dns_changes.len()
        );
        if let Some(f) = &self.flood {
            let _ = writeln!(
                o,
                "flood: {} SYNs from random sources in {:.1} s ({:.0}/s) at {:.0}–{:.0} s; right after: \
                 conntrack {:.0}, half-open {:.0}, over the new-flow budget {:.0}",
                f.sent,
                f.to - f.from,
                f.sent as f64 / (f.to - f.from).max(0.001),
                f.from,
                f.to,
                f.conntrack_after,
                f.half_open_after,
                f.over_budget
            );
        }
        let restarts: Vec<String> = self
            .restarts
            .iter()
            .map(|r| {
                format!(
                    "{:.0} s (ready {:.1} s later)",
                    r.killed_at,
                    r.ready_at - r.killed_at
                )
            })
            .collect();
        if !restarts.is_empty() {
            let _ = writeln!(o, "restarts: {}", restarts.join(", "));
        }
        let _ = writeln!(
            o,
            "\n{:<12} {:>9} {:>7} {:>9} {:>10} {:>8}",
            "kind", "attempts", "failed", "in flood", "in restart", "outside"
        );
        let mut sums = [0u64; 5];
        for (kind, row) in self.by_kind() {
            let _ = writeln!(
                o,
                "{kind:<12} {:>9} {:>7} {:>9} {:>10} {:>8}",
                row[0], row[1], row[2], row[3], row[4]
            );
            for (s, v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
        let _ = writeln!(
            o,
            "{:<12} {:>9} {:>7} {:>9} {:>10} {:>8}",
            "total", sums[0], sums[1], sums[2], sums[3], sums[4]
        );
        for f in self.failures.iter().take(20) {
            let place = match self.window_of(f) {
                Some(WindowKind::Flood) => "flood",
                Some(WindowKind::Restart) => "restart",
                None => "OUTSIDE",
            };
            let _ = writeln!(
                o,
                "  failed {} {:.1}–{:.1} s [{place}]: {}",
                f.kind, f.from, f.to, f.error
            );
        }
        if self.failures.len() > 20 {
            let _ = writeln!(o, "  … and {} more", self.failures.len() - 20);
        }
        let _ = writeln!(
            o,
            "\n{} samples (every ~{:.0} s) after a {:.0} s warm-up. Flat: each stretch's last minute \
             within 1.2 × its first (plus slack); the stretches are before the flood and from \
             {FLOOD_AFTERMATH:.0} s after it (its half-open entries time out) to the end.",
            self.samples.len(),
            self.sample_interval(),
            self.warm_up
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let _ = writeln!(
            o,
            "{:<36} {:>8} {:>8} {:>8} {:>8} {:>21} {:>21} {:>10}  flat",
            "series",
            "first",
            "last",
            "min",
            "max",
            "before flood: 1st→last",
            "after flood: 1st→last",
            "flood step"
        );
        for s in self.all_series() {
            let flat = match (s.judged, s.flat) {
                (false, _) => "(shown only)".to_string(),
                (true, Some(true)) => "yes".to_string(),
                (true, Some(false)) => "NO".to_string(),
                (true, None) => "not judged (run too short)".to_string(),
            };
            let name = if s.unit.is_empty() {
                s.name.to_string()
            } else {
                format!("{} ({})", s.name, s.unit)
            };
            let stretch = |i: usize| {
                s.segments.get(i).map_or("-".to_string(), |g| {
                    format!("{}→{}", opt(g.start_median), opt(g.end_median))
                })
            };
            let _ = writeln!(
                o,
                "{name:<36} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>21} {:>21} {:>10}  {flat}",
                s.first,
                s.last,
                s.min,
                s.max,
                stretch(0),
                stretch(1),
                s.flood_step.map_or("-".to_string(), |v| format!("{v:+.0}"))
            );
        }
        let why = self.verdict();
        if why.is_empty() {
            let _ = writeln!(o, "\nPASSED");
        } else {
            let _ = writeln!(o, "\nFAILED:");
            for w in why {
                let _ = writeln!(o, "  - {w}");
            }
        }
        o
    }

    fn sample_interval(&self) -> f64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) if self.samples.len() > 1 => {
                (b.at - a.at) / (self.samples.len() - 1) as f64
            }
            _ => 0.0,
        }
    }

    /// The whole report as JSON.
    pub fn to_json(&self) -> Value {
        let kinds: BTreeMap<&str, Value> = self
            .by_kind()
            .into_iter()
            .map(|(k, r)| {
                (
                    k,
                    json!({"attempts": r[0], "failed": r[1], "in_flood": r[2],
                           "in_restart": r[3], "outside": r[4]}),
                )
            })
            .collect();
        let window = |w: &Failure| match self.window_of(w) {
            Some(WindowKind::Flood) => "flood",
            Some(WindowKind::Restart) => "restart",
            None => "outside",
        };
        json!({
            "seconds": self.seconds,
            "warm_up_seconds": self.warm_up,
            "interrupted": self.interrupted,
            "passed": self.verdict().is_empty(),
            "verdict": self.verdict(),
            "kinds": kinds,
            "failures": self.failures.iter().map(|f| json!({
                "kind": f.kind, "from": f.from, "to": f.to, "window": window(f), "error": f.error,
            })).collect::<Vec<_>>(),
            "windows": self.windows.iter().map(|w| json!({
                "kind": match w.kind { WindowKind::Flood => "flood", WindowKind::Restart => "restart" },
                "from": w.from, "to": w.to,
            })).collect::<Vec<_>>(),
            "restarts": self.restarts.iter().map(|r| json!({
                "killed_at": r.killed_at, "ready_at": r.ready_at,
            })).collect::<Vec<_>>(),
            "config_changes": self.config_changes.iter().map(|(at, what)| json!({"at": at, "change": what})).collect::<Vec<_>>(),
            "dns_changes": self.dns_changes.iter().map(|(at, what)| json!({"at": at, "change": what})).collect::<Vec<_>>(),
            "flood": self.flood.as_ref().map(|f| json!({
                "from": f.from, "to": f.to, "syns_sent": f.sent,
                "conntrack_after": f.conntrack_after, "half_open_after": f.half_open_after,
                "over_budget": f.over_budget,
            })),
            "series": self.all_series().iter().map(|s| json!({
                "name": s.name, "unit": s.unit, "first": s.first, "last": s.last,
                "min": s.min, "max": s.max, "flood_step": s.flood_step,
                "flat": s.flat, "judged": s.judged,
                "segments": s.segments.iter().map(|g| json!({
                    "label": g.label, "from": g.from, "to": g.to,
                    "start_median": g.start_median, "end_median": g.end_median,
                    "limit": g.limit, "flat": g.flat,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "samples": self.samples.iter().map(|s| json!({
                "at": s.at, "agent": s.life, "rss_kib": s.rss_kib, "fds": s.fds,
                "conntrack_entries": s.conntrack, "half_open_entries": s.half_open,
            })).collect::<Vec<_>>(),
            "problems": self.problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, rss: u64) -> Sample {
        Sample {
            at,
            life: 1,
            rss_kib: rss,
            fds: 10,
            conntrack: 1000.0,
            half_open: 2.0,
        }
    }

    fn failure(from: f64, to: f64) -> Failure {
        Failure {
            kind: "tcp-churn",
            from,
            to,
            error: "x".into(),
        }
    }

    #[test]
    fn failures_are_sorted_into_windows() {
        let o = Observed {
            windows: vec![
                Window {
                    kind: WindowKind::Restart,
                    from: 100.0,
                    to: 105.0,
                },
                Window {
                    kind: WindowKind::Flood,
                    from: 200.0,
                    to: 213.0,
                },
            ],
            failures: vec![
                failure(99.0, 100.5),
                failure(212.0, 214.0),
                failure(150.0, 151.0),
            ],
            ..Observed::default()
        };
        assert_eq!(o.window_of(&o.failures[0]), Some(WindowKind::Restart));
        assert_eq!(o.window_of(&o.failures[1]), Some(WindowKind::Flood));
        assert_eq!(o.window_of(&o.failures[2]), None);
        assert_eq!(o.failures_outside().len(), 1);
        assert_eq!(o.verdict().len(), 1);
    }

    #[test]
    fn growth_is_the_last_minute_against_the_first_after_warm_up() {
        // Flat: noise around 50 MiB.
        let flat: Vec<Sample> = (0..60)
            .map(|i| sample(i as f64 * 10.0, 50_000 + (i % 3) * 500))
            .collect();
        let o = Observed {
            warm_up: 30.0,
            samples: flat,
            ..Observed::default()
        };
        assert_eq!(o.all_series()[0].flat, Some(true));
        assert!(o.verdict().is_empty(), "{:?}", o.verdict());
        // A leak: about 2.3 MiB a minute.
        let leak: Vec<Sample> = (0..60)
            .map(|i| sample(i as f64 * 10.0, 50_000 + i * 400))
            .collect();
        let o = Observed {
            warm_up: 30.0,
            samples: leak,
            ..Observed::default()
        };
        assert_eq!(o.all_series()[0].flat, Some(false));
        assert_eq!(o.verdict().len(), 1, "{:?}", o.verdict());
        // Too short to judge.
        let o = Observed {
            warm_up: 30.0,
            samples: (0..9).map(|i| sample(i as f64 * 10.0, 50_000)).collect(),
            ..Observed::default()
        };
        assert_eq!(o.all_series()[0].flat, None);
    }

    #[test]
    fn a_flood_is_a_step_shown_apart_and_each_side_must_be_flat() {
        let flood = Some(Flood {
            from: 300.0,
            to: 310.0,
            ..Flood::default()
        });
        // The agent that swept the flooded table keeps 15 MiB more.
        let step = |at: f64| if at < 300.0 { 35_000 } else { 50_000 };
        let o = Observed {
            warm_up: 30.0,
            samples: (0..60)
                .map(|i| sample(i as f64 * 10.0, step(i as f64 * 10.0)))
                .collect(),
            flood: flood.clone(),
            ..Observed::default()
        };
        let rss = &o.all_series()[0];
        assert_eq!(rss.flat, Some(true));
        assert_eq!(rss.flood_step, Some(15_000.0));
        assert_eq!(rss.segments.len(), 2);
        // Still growing after the flood: growth.
        let growing = |at: f64| {
            step(at)
                + if at > 375.0 {
                    ((at - 375.0) * 100.0) as u64
                } else {
                    0
                }
        };
        let o = Observed {
            warm_up: 30.0,
            samples: (0..60)
                .map(|i| sample(i as f64 * 10.0, growing(i as f64 * 10.0)))
                .collect(),
            flood,
            ..Observed::default()
        };
        assert_eq!(o.all_series()[0].flat, Some(false));
        assert!(
            o.verdict()[0].contains("after the flood"),
            "{:?}",
            o.verdict()
        );
    }
}
