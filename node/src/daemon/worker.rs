//! The trainer thread. libtorch is blocking and its tensors must not be
//! touched from the async side, so one OS thread owns the `Trainer` and
//! serves commands in order; every command carries its own reply channel.
//!
//! Injected faults that act on training are carried out here, between
//! steps: a pause holds the next step until it ends, and label-flip turns
//! the trainer's labels over while it is active.

use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::fault::Faults;
use crate::train::eval::EvalMetrics;
use crate::train::trainer::Trainer;

/// The end of a local phase.
#[derive(Debug, Clone)]
pub struct PhaseDone {
    pub params: Vec<f32>,
    /// Mean training loss over the phase's steps.
    pub loss: f64,
    /// Examples processed in the phase.
    pub samples: u64,
    /// Steps completed in total.
    pub steps_done: u64,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Command {
    Train { steps: u64, reply: Reply<PhaseDone> },
    SetParams { values: Vec<f32>, reply: Reply<()> },
    Params { reply: Reply<Vec<f32>> },
    Evaluate { reply: Reply<EvalMetrics> },
    Checkpoint { dir: PathBuf, options: serde_json::Value, reply: Reply<u64> },
}

/// Handle to the trainer thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Worker {
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(trainer: Trainer, faults: Arc<Faults>) -> Worker {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("murmur-trainer".into())
            .spawn(move || serve(trainer, rx, &faults))
            .ok();
        Worker { commands: Some(tx), thread }
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> oneshot::Receiver<Result<T, String>> {
        let (tx, rx) = oneshot::channel();
        if let Some(c) = &self.commands {
            // If the thread is gone the receiver reports it as a closed channel.
            let _ = c.send(make(tx));
        }
        rx
    }

    /// Starts `steps` local steps; the receiver resolves when they are done.
    pub fn train(&self, steps: u64) -> oneshot::Receiver<Result<PhaseDone, String>> {
        self.ask(|reply| Command::Train { steps, reply })
    }

    pub async fn set_params(&self, values: Vec<f32>) -> Result<(), String> {
        flatten(self.ask(|reply| Command::SetParams { values, reply }).await)
    }

    pub async fn params(&self) -> Result<Vec<f32>, String> {
        flatten(self.ask(|reply| Command::Params { reply }).await)
    }

    pub async fn evaluate(&self) -> Result<EvalMetrics, String> {
        flatten(self.ask(|reply| Command::Evaluate { reply }).await)
    }

    /// Writes a checkpoint; returns the number of steps it holds.
    pub async fn checkpoint(
        &self,
        dir: PathBuf,
        options: serde_json::Value,
    ) -> Result<u64, String> {
        flatten(self.ask(|reply| Command::Checkpoint { dir, options, reply }).await)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.commands.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Flattens a reply from a thread that may have died.
pub fn flatten<T>(r: Result<Result<T, String>, oneshot::error::RecvError>) -> Result<T, String> {
    r.unwrap_or_else(|_| Err("the trainer thread stopped".into()))
}

fn serve(mut trainer: Trainer, commands: mpsc::Receiver<Command>, faults: &Faults) {
    while let Ok(cmd) = commands.recv() {
        match cmd {
            Command::Train { steps, reply } => {
                let _ = reply.send(train(&mut trainer, steps, faults));
            }
            Command::SetParams { values, reply } => {
                let _ = reply.send(trainer.set_flat(&values).map_err(|e| e.to_string()));
            }
            Command::Params { reply } => {
                let _ =
                    reply.send(trainer.model.params().map(|p| p.values).map_err(|e| e.to_string()));
            }
            Command::Evaluate { reply } => {
                let _ = reply.send(Ok(trainer.evaluate()));
            }
            Command::Checkpoint { dir, options, reply } => {
                let saved = trainer.save_checkpoint(&dir, options).map(|()| trainer.steps_done());
                let _ = reply.send(saved.map_err(|e| e.to_string()));
            }
        }
    }
}

fn train(trainer: &mut Trainer, steps: u64, faults: &Faults) -> Result<PhaseDone, String> {
    let mut loss = 0.0;
    for _ in 0..steps {
        sit_out_pause(faults);
        trainer.set_label_flip(faults.label_flip(Instant::now()));
        loss += trainer.step().map_err(|e| e.to_string())?.loss;
    }
    let params = trainer.model.params().map_err(|e| e.to_string())?.values;
    Ok(PhaseDone {
        params,
        loss: loss / steps.max(1) as f64,
        samples: steps * trainer.config.batch_size as u64,
        steps_done: trainer.steps_done(),
    })
}

/// Blocks this thread while a pause is active, waking at its end (or every
/// 20 ms, to notice a pause cleared early).
fn sit_out_pause(faults: &Faults) {
    const POLL: Duration = Duration::from_millis(20);
    while let Some(end) = faults.pause_end(Instant::now()) {
        let left = end.map_or(POLL, |e| e.saturating_duration_since(Instant::now()));
        std::thread::sleep(left.min(POLL));
    }
}
