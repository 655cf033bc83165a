//! What a fault is: `FaultSpec`, parsed from the `--fault` syntax and from
//! the API's typed `Fault`, and shown back in that syntax.
//!
//! ```text
//! SPEC     := KIND [":" ARGS] ("," "for=" DURATION | "," "from=" ROUND)*
//! crash[:R]            exit with status 70 when round R begins (default: the next round)
//! pause[:DURATION]     stop training and networking (same as pause,for=DURATION)
//! drop:P[:in|out]      lose a fraction P of payloads, both directions unless told
//! delay:D[~J]          hold each outgoing payload back D +/- J (uniform)
//! bandwidth:RATE       pace outgoing payloads to RATE bytes/s (1MB/s, 500kB/s, 2MiB/s)
//! partition:PEER[+PEER...]  no traffic with these peers
//! noise:S | sign-flip | scale:C | nan   Byzantine: change what the node sends
//! label-flip           train on flipped labels
//! ```
//!
//! `for=` bounds how long the fault lasts once active (default: until
//! cleared); `from=` delays it until that round begins. This module only
//! describes faults; `injector` keeps and applies them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use libp2p::PeerId;
use murmur_proto::v1 as pb;

/// Which payloads a drop fault loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Both,
    Outgoing,
    Incoming,
}

impl Direction {
    pub fn outgoing(self) -> bool {
        self != Direction::Incoming
    }

    pub fn incoming(self) -> bool {
        self != Direction::Outgoing
    }
}

/// The kinds of fault and their parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// Exit non-zero when round `round` begins; `None`: at the next round.
    Crash {
        round: Option<u64>,
    },
    Pause,
    Drop {
        fraction: f64,
        direction: Direction,
    },
    Delay {
        delay: Duration,
        jitter: Duration,
    },
    Bandwidth {
        bytes_per_second: u64,
    },
    Partition {
        peers: Vec<PeerId>,
    },
    Noise {
        scale: f64,
    },
    SignFlip,
    Scale {
        factor: f64,
    },
    Nan,
    LabelFlip,
}

impl FaultKind {
    /// Whether it changes the vectors the node sends.
    pub fn is_byzantine(&self) -> bool {
        matches!(
            self,
            FaultKind::Noise { .. }
                | FaultKind::SignFlip
                | FaultKind::Scale { .. }
                | FaultKind::Nan
        )
    }
}

/// The longest `for=` a fault may have: a bound, so that the time it ends
/// is always a representable instant (no overflow, no panic).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The longest a delay (plus its jitter) may hold one transfer.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// One fault: what, for how long once active, and from which round.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// `None`: until cleared.
    pub duration: Option<Duration>,
    /// `None`: active at once.
    pub from_round: Option<u64>,
}

/// Why a fault spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault {spec:?}: {reason}")]
pub struct FaultError {
    pub spec: String,
    pub reason: String,
}

fn err(spec: &str, reason: impl Into<String>) -> FaultError {
    FaultError { spec: spec.to_string(), reason: reason.into() }
}

impl FromStr for FaultSpec {
    type Err = FaultError;

    fn from_str(text: &str) -> Result<FaultSpec, FaultError> {
        let text = text.trim();
        let mut parts = text.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, args) = head.split_once(':').unwrap_or((head, ""));
        let mut spec =
            FaultSpec { kind: parse_kind(text, name, args)?, duration: None, from_round: None };
        if spec.kind == FaultKind::Pause && !args.is_empty() {
            spec.duration = Some(parse_duration(args).map_err(|e| err(text, e))?);
        }
        for modifier in parts {
            match modifier.split_once('=') {
                Some(("for", d)) if spec.duration.is_none() => {
                    spec.duration = Some(parse_duration(d).map_err(|e| err(text, e))?);
                }
                Some(("for", _)) => return Err(err(text, "the duration is given twice")),
                Some(("from", r)) => {
                    let round = r.parse().map_err(|_| {
                        err(text, format!("from={r:?} must be a round number, as in from=5"))
                    })?;
                    spec.from_round = Some(round);
                }
                _ => {
                    return Err(err(
                        text,
                        format!(
                            "unknown modifier {modifier:?} (expected for=DURATION or from=ROUND)"
                        ),
                    ));
                }
            }
        }
        spec.check().map_err(|reason| err(text, reason))?;
        Ok(spec)
    }
}

fn parse_kind(text: &str, name: &str, args: &str) -> Result<FaultKind, FaultError> {
    let no_args = |kind: FaultKind| {
        if args.is_empty() {
            Ok(kind)
        } else {
            Err(err(text, format!("{name} takes no arguments")))
        }
    };
    let number = |what: &str, s: &str| -> Result<f64, FaultError> {
        s.parse::<f64>().map_err(|_| err(text, format!("{what} {s:?} is not a number")))
    };
    match name {
        "crash" if args.is_empty() => Ok(FaultKind::Crash { round: None }),
        "crash" => args
            .parse()
            .map(|r| FaultKind::Crash { round: Some(r) })
            .map_err(|_| err(text, format!("crash:{args} needs a round number, as in crash:5"))),
        // Its duration, if any, is read by the caller.
        "pause" => Ok(FaultKind::Pause),
        "drop" => {
            let (p, dir) = args.split_once(':').unwrap_or((args, ""));
            let direction = match dir {
                "" | "both" => Direction::Both,
                "in" => Direction::Incoming,
                "out" => Direction::Outgoing,
                other => {
                    return Err(err(
                        text,
                        format!("drop direction {other:?} must be in, out or both"),
                    ));
                }
            };
            Ok(FaultKind::Drop { fraction: number("drop fraction", p)?, direction })
        }
        "delay" => {
            let (d, j) = args.split_once('~').unwrap_or((args, "0ms"));
            let delay = parse_duration(d).map_err(|e| err(text, e))?;
            let jitter = parse_duration(j).map_err(|e| err(text, e))?;
            Ok(FaultKind::Delay { delay, jitter })
        }
        "bandwidth" => Ok(FaultKind::Bandwidth {
            bytes_per_second: parse_rate(args).map_err(|e| err(text, e))?,
        }),
        "partition" => {
            let peers = args
                .split('+')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.parse::<PeerId>()
                        .map_err(|e| err(text, format!("{p:?} is not a peer id ({e})")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(FaultKind::Partition { peers })
        }
        "noise" => Ok(FaultKind::Noise { scale: number("noise scale", args)? }),
        "sign-flip" => no_args(FaultKind::SignFlip),
        "scale" => Ok(FaultKind::Scale { factor: number("scale factor", args)? }),
        "nan" => no_args(FaultKind::Nan),
        "label-flip" => no_args(FaultKind::LabelFlip),
        other => Err(err(
            text,
            format!(
                "unknown fault {other:?} (expected crash, pause, drop, delay, bandwidth, partition, noise, sign-flip, scale, nan or label-flip)"
            ),
        )),
    }
}

impl FaultSpec {
    /// The checks both the text and the typed form must pass.
    fn check(&self) -> Result<(), String> {
        match &self.kind {
            FaultKind::Drop { fraction, .. } if !(*fraction > 0.0 && *fraction <= 1.0) => {
                Err(format!("the drop fraction must be in (0, 1] (got {fraction})"))
            }
            FaultKind::Bandwidth { bytes_per_second: 0 } => {
                Err("the bandwidth must be > 0 bytes/s (use partition to cut a peer off)".into())
            }
            FaultKind::Partition { peers } if peers.is_empty() => {
                Err("partition needs at least one peer id, as in partition:12D3KooW...".into())
            }
            FaultKind::Noise { scale } if !(scale.is_finite() && *scale > 0.0) => {
                Err(format!("the noise scale must be a finite number > 0 (got {scale})"))
            }
            FaultKind::Scale { factor } if !factor.is_finite() => {
                Err(format!("the scale factor must be finite (got {factor})"))
            }
            FaultKind::Crash { .. } if self.duration.is_some() => {
                Err("a crash has no duration (drop for=)".into())
            }
            FaultKind::Delay { delay, jitter } if delay.saturating_add(*jitter) > MAX_DELAY => {
                Err(format!(
                    "a delay of {} plus jitter {} is longer than the most a transfer can be held ({})",
                    show_duration(*delay),
                    show_duration(*jitter),
                    show_duration(MAX_DELAY)
                ))
            }
            _ if self.duration == Some(Duration::ZERO) => {
                Err("for= must be longer than 0 (leave it out to last until cleared)".into())
            }
            _ if self.duration.is_some_and(|d| d > MAX_DURATION) => Err(format!(
                "for={} is longer than the most a fault may last ({}; leave for= out to last until cleared)",
                show_duration(self.duration.unwrap_or_default()),
                show_duration(MAX_DURATION)
            )),
            _ => Ok(()),
        }
    }

    /// From the API's typed form.
    pub fn from_proto(f: &pb::Fault) -> Result<FaultSpec, FaultError> {
        use pb::fault::Kind;
        let text = format!("{f:?}");
        let kind = match &f.kind {
            None => return Err(err(&text, "no fault kind set")),
            Some(Kind::Crash(c)) => FaultKind::Crash { round: (c.round > 0).then_some(c.round) },
            Some(Kind::Pause(_)) => FaultKind::Pause,
            Some(Kind::Drop(d)) => FaultKind::Drop {
                fraction: d.fraction,
                direction: match pb::Direction::try_from(d.direction) {
                    Ok(pb::Direction::Both) => Direction::Both,
                    Ok(pb::Direction::Outgoing) => Direction::Outgoing,
                    Ok(pb::Direction::Incoming) => Direction::Incoming,
                    Err(_) => return Err(err(&text, format!("unknown direction {}", d.direction))),
                },
            },
            Some(Kind::Delay(d)) => FaultKind::Delay {
                delay: Duration::from_millis(d.delay_ms),
                jitter: Duration::from_millis(d.jitter_ms),
            },
            Some(Kind::Bandwidth(b)) => {
                FaultKind::Bandwidth { bytes_per_second: b.bytes_per_second }
            }
            Some(Kind::Partition(p)) => FaultKind::Partition {
                peers: p
                    .peers
                    .iter()
                    .map(|s| {
                        s.parse::<PeerId>()
                            .map_err(|e| err(&text, format!("{s:?} is not a peer id ({e})")))
                    })
                    .collect::<Result<_, _>>()?,
            },
            Some(Kind::Noise(n)) => FaultKind::Noise { scale: n.scale },
            Some(Kind::SignFlip(_)) => FaultKind::SignFlip,
            Some(Kind::Scale(s)) => FaultKind::Scale { factor: s.factor },
            Some(Kind::Nan(_)) => FaultKind::Nan,
            Some(Kind::LabelFlip(_)) => FaultKind::LabelFlip,
        };
        let spec = FaultSpec {
            kind,
            duration: (f.duration_ms > 0).then(|| Duration::from_millis(f.duration_ms)),
            from_round: f.from_round,
        };
        spec.check().map_err(|reason| err(&spec.to_string(), reason))?;
        Ok(spec)
    }

    /// The API's typed form.
    pub fn to_proto(&self) -> pb::Fault {
        use pb::fault::Kind;
        let kind = match &self.kind {
            FaultKind::Crash { round } => Kind::Crash(pb::Crash { round: round.unwrap_or(0) }),
            FaultKind::Pause => Kind::Pause(pb::Pause {}),
            FaultKind::Drop { fraction, direction } => Kind::Drop(pb::Drop {
                fraction: *fraction,
                direction: match direction {
                    Direction::Both => pb::Direction::Both,
                    Direction::Outgoing => pb::Direction::Outgoing,
                    Direction::Incoming => pb::Direction::Incoming,
                } as i32,
            }),
            FaultKind::Delay { delay, jitter } => Kind::Delay(pb::Delay {
                delay_ms: delay.as_millis() as u64,
                jitter_ms: jitter.as_millis() as u64,
            }),
            FaultKind::Bandwidth { bytes_per_second } => {
                Kind::Bandwidth(pb::Bandwidth { bytes_per_second: *bytes_per_second })
            }
            FaultKind::Partition { peers } => Kind::Partition(pb::Partition {
                peers: peers.iter().map(PeerId::to_string).collect(),
            }),
            FaultKind::Noise { scale } => Kind::Noise(pb::Noise { scale: *scale }),
            FaultKind::SignFlip => Kind::SignFlip(pb::SignFlip {}),
            FaultKind::Scale { factor } => Kind::Scale(pb::Scale { factor: *factor }),
            FaultKind::Nan => Kind::Nan(pb::NanValues {}),
            FaultKind::LabelFlip => Kind::LabelFlip(pb::LabelFlip {}),
        };
        pb::Fault {
            kind: Some(kind),
            duration_ms: self.duration.map_or(0, |d| d.as_millis() as u64),
            from_round: self.from_round,
        }
    }
}

impl fmt::Display for FaultSpec {
    /// The `--fault` syntax, which parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FaultKind::Crash { round: None } => write!(f, "crash")?,
            FaultKind::Crash { round: Some(r) } => write!(f, "crash:{r}")?,
            FaultKind::Pause => write!(f, "pause")?,
            FaultKind::Drop { fraction, direction } => {
                write!(f, "drop:{fraction}")?;
                match direction {
                    Direction::Both => {}
                    Direction::Outgoing => write!(f, ":out")?,
                    Direction::Incoming => write!(f, ":in")?,
                }
            }
            FaultKind::Delay { delay, jitter } => {
                write!(f, "delay:{}", show_duration(*delay))?;
                if !jitter.is_zero() {
                    write!(f, "~{}", show_duration(*jitter))?;
                }
            }
            FaultKind::Bandwidth { bytes_per_second } => {
                write!(f, "bandwidth:{bytes_per_second}B/s")?
            }
            FaultKind::Partition { peers } => {
                let peers: Vec<String> = peers.iter().map(PeerId::to_string).collect();
                write!(f, "partition:{}", peers.join("+"))?;
            }
            FaultKind::Noise { scale } => write!(f, "noise:{scale}")?,
            FaultKind::SignFlip => write!(f, "sign-flip")?,
            FaultKind::Scale { factor } => write!(f, "scale:{factor}")?,
            FaultKind::Nan => write!(f, "nan")?,
            FaultKind::LabelFlip => write!(f, "label-flip")?,
        }
        if let Some(d) = self.duration {
            write!(f, ",for={}", show_duration(d))?;
        }
        if let Some(r) = self.from_round {
            write!(f, ",from={r}")?;
        }
        Ok(())
    }
}

/// `250ms`, `30s`, `2m`, `1h`, or `1.5s`; a unit is required.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("duration {s:?} needs a unit: ms, s, m or h (as in 500ms)")),
    };
    let value: f64 =
        num.parse().map_err(|_| format!("duration {s:?} is not a number with a unit"))?;
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("duration {s:?} is out of range"))
}

fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) && ms > 0 { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

/// Bytes per second: `1MB/s`, `500kB/s`, `2MiB/s`, `1000B/s` or a bare number.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let body = s.strip_suffix("/s").unwrap_or(s);
    let split = body.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let scale = match unit {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "rate {s:?} has an unknown unit (B, kB, MB, GB, KiB, MiB or GiB per second)"
            ));
        }
    };
    let value: f64 =
        num.parse().map_err(|_| format!("rate {s:?} is not a number of bytes per second"))?;
    let rate = value * scale;
    if rate.is_finite() && rate >= 1.0 && rate < u64::MAX as f64 {
        Ok(rate as u64)
    } else {
        Err(format!("rate {s:?} must be at least 1 byte/s"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_and_shows_back() {
        let peer = PeerId::random();
        let cases = [
            "crash",
            "crash:5",
            "pause",
            "pause,for=5s",
            "drop:0.3",
            "drop:0.5:out,for=30s",
            "drop:1:in,from=3",
            "delay:200ms~50ms",
            "delay:1s",
            "bandwidth:1000000B/s",
            &format!("partition:{peer}"),
            "noise:0.1",
            "sign-flip,from=2",
            "scale:10",
            "nan,for=1500ms",
            "label-flip",
        ];
        for text in cases {
            let spec: FaultSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text, "{text}");
            let typed = FaultSpec::from_proto(&spec.to_proto()).unwrap();
            assert_eq!(typed, spec, "{text} through the typed form");
        }
    }

    #[test]
    fn shorthands_mean_the_same() {
        let a: FaultSpec = "pause:2s".parse().unwrap();
        assert_eq!(a.to_string(), "pause,for=2s");
        let b: FaultSpec = "bandwidth:1MB/s".parse().unwrap();
        assert_eq!(b.kind, FaultKind::Bandwidth { bytes_per_second: 1_000_000 });
        let c: FaultSpec = "bandwidth:2MiB/s".parse().unwrap();
        assert_eq!(c.kind, FaultKind::Bandwidth { bytes_per_second: 2 * 1024 * 1024 });
        let d: FaultSpec = "delay:100ms".parse().unwrap();
        assert_eq!(
            d.kind,
            FaultKind::Delay { delay: Duration::from_millis(100), jitter: Duration::ZERO }
        );
    }

    #[test]
    fn bad_specs_name_the_value() {
        let cases = [
            ("explode", "unknown fault \"explode\""),
            ("drop:1.5", "(got 1.5)"),
            ("drop:0", "(got 0)"),
            ("drop:x", "\"x\" is not a number"),
            ("drop:0.3:sideways", "\"sideways\""),
            ("delay:200", "needs a unit"),
            ("bandwidth:0", "at least 1 byte/s"),
            ("bandwidth:3furlongs", "unknown unit"),
            ("partition:bob", "\"bob\" is not a peer id"),
            ("partition:", "at least one peer id"),
            ("noise:-1", "(got -1)"),
            ("scale:inf", "(got inf)"),
            ("sign-flip:3", "takes no arguments"),
            ("crash:soon", "crash:5"),
            ("crash:3,for=2s", "no duration"),
            ("drop:0.3,for=0s", "longer than 0"),
            ("drop:0.3,until=5", "unknown modifier \"until=5\""),
            ("drop:0.3,from=later", "from=\"later\""),
            ("pause:2s,for=3s", "given twice"),
            ("drop:0.5,for=10000000000000000000s", "longer than the most a fault may last"),
            ("pause:1000000h", "longer than the most a fault may last"),
            ("delay:2h", "longer than the most a transfer can be held"),
        ];
        for (text, needle) in cases {
            let e = text.parse::<FaultSpec>().unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(e.contains(text), "{text}: the error names the spec: {e}");
        }
    }

    #[test]
    fn typed_faults_are_checked_like_text() {
        let mut f = "drop:0.3".parse::<FaultSpec>().unwrap().to_proto();
        if let Some(pb::fault::Kind::Drop(d)) = &mut f.kind {
            d.fraction = 2.0;
        }
        assert!(FaultSpec::from_proto(&f).unwrap_err().to_string().contains("(got 2)"));
        let empty = pb::Fault::default();
        assert!(FaultSpec::from_proto(&empty).unwrap_err().to_string().contains("no fault kind"));
        // Numbers at the edge of u64 are refused, never overflowed.
        let mut long = "pause".parse::<FaultSpec>().unwrap().to_proto();
        long.duration_ms = u64::MAX;
        assert!(FaultSpec::from_proto(&long).unwrap_err().to_string().contains("most a fault"));
        let mut slow = "delay:1ms".parse::<FaultSpec>().unwrap().to_proto();
        if let Some(pb::fault::Kind::Delay(d)) = &mut slow.kind {
            d.delay_ms = u64::MAX;
            d.jitter_ms = u64::MAX;
        }
        assert!(FaultSpec::from_proto(&slow).unwrap_err().to_string().contains("can be held"));
    }
}
