//! Training progress for a person: a progress bar on a terminal, plain lines
//! (every `log_every` steps) when output goes to a file or a pipe.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::train::eval::EvalMetrics;
use crate::train::trainer::StepReport;

#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
    total: u64,
    started: Instant,
    first_step: u64,
}

impl Progress {
    pub fn new(first_step: u64, total: u64, log_every: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(first_step);
            bar
        });
        Progress { bar, log_every: log_every.max(1), total, started: Instant::now(), first_step }
    }

    pub fn step(&self, r: &StepReport) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step);
                bar.set_message(format!("loss {:.4} lr {:.2e}", r.loss, r.lr));
            }
            None if r.step.is_multiple_of(self.log_every) || r.step == self.total => {
                let rate = (r.step - self.first_step) as f64
                    / self.started.elapsed().as_secs_f64().max(1e-9);
                println!(
                    "step {}/{}  loss {:.4}  lr {:.2e}  {:.1} steps/s",
                    r.step, self.total, r.loss, r.lr, rate
                );
            }
            None => {}
        }
    }

    pub fn eval(&self, step: u64, m: &EvalMetrics) {
        self.line(format!("eval  step {step}: {m}"));
    }

    pub fn line(&self, s: String) {
        match &self.bar {
            Some(bar) => bar.println(s),
            None => println!("{s}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
