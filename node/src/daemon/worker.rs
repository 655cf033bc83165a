//! The trainer thread. libtorch is blocking and its tensors must not be
//! touched from the async side, so one OS thread owns the `Trainer` and
//! carries out `Job`s in the order they were submitted; each job answers
//! with exactly one `Done` (or a `WorkerError`) on the reply channel, which
//! the driver reads as one more event. Submitting never waits: "continue
//! from these parameters" is `SetParams` then `Train`, queued together,
//! and the driver goes on serving peers while the trainer works.
//!
//! Injected faults that act on training are carried out here, between
//! steps: a pause holds the next step until it ends, and label-flip turns
//! the trainer's labels over while it is active.
//!
//! A node told to stop asks for no more steps (`stop_training`): the phase
//! under way ends at its next step and any phase queued behind it runs
//! none, so the final checkpoint waits for one step, not for the phases
//! an overlapped strategy asked for ahead.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as async_mpsc;

use crate::fault::Faults;
use crate::mix::mixer::StrategyState;
use crate::params::ParamsError;
use crate::train::eval::EvalMetrics;
use crate::train::trainer::{TrainError, Trainer};

/// Jobs that may wait in the queue; the driver never has more than a few
/// (a round's end queues at most four), so a full queue is a bug, not load.
const QUEUE: usize = 64;

/// What the trainer is asked to do.
#[derive(Debug)]
pub enum Job {
    /// Run `steps` local steps.
    Train { steps: u64 },
    /// Replace the model's parameters.
    SetParams(Vec<f32>),
    /// Add these values to the model's parameters (answered `ParamsSet`).
    Shift(Vec<f32>),
    /// Held-out metrics of the current parameters.
    Evaluate,
    /// Write a checkpoint (with the strategy's state, when it keeps one).
    Checkpoint { dir: PathBuf, options: serde_json::Value, strategy: Option<StrategyState> },
}

/// What a job did, in the order the jobs were submitted.
#[derive(Debug)]
pub enum Done {
    Trained(PhaseDone),
    ParamsSet,
    /// Held-out metrics, and the seconds the evaluation took.
    Evaluated {
        metrics: EvalMetrics,
        seconds: f64,
    },
    /// The checkpoint holds this many steps; writing it took `seconds`.
    Checkpointed {
        steps: u64,
        seconds: f64,
    },
}

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
    /// When the phase started on the trainer thread, and how long it took.
    pub started: Instant,
    pub seconds: f64,
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the trainer thread stopped")]
    Stopped,
    #[error("the trainer's job queue is full ({QUEUE} jobs)")]
    Full,
    #[error("training failed: {0}")]
    Train(#[source] TrainError),
    #[error("cannot set the parameters: {0}")]
    Params(#[source] ParamsError),
    #[error("cannot write the checkpoint in {dir}: {source}")]
    Checkpoint {
        dir: PathBuf,
        #[source]
        source: TrainError,
    },
}

pub type Reply = Result<Done, WorkerError>;

/// Handle to the trainer thread; dropping it stops the thread once its
/// queued jobs are done.
#[derive(Debug)]
pub struct Worker {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Set once the node stops: local phases run no more steps.
    stopping: Arc<AtomicBool>,
}

impl Worker {
    /// Starts the thread; its replies come on the returned receiver.
    pub fn spawn(trainer: Trainer, faults: Arc<Faults>) -> (Worker, async_mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (reply_tx, reply_rx) = async_mpsc::channel(QUEUE);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("murmur-trainer".into())
            .spawn(move || serve(trainer, rx, &reply_tx, &faults, &stop))
            .ok();
        (Worker { jobs: Some(tx), thread, stopping }, reply_rx)
    }

    /// No more local steps: the phase under way ends at its next step and
    /// queued phases run none (each still answers, with what it did).
    pub fn stop_training(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Queues `job`; never waits.
    pub fn submit(&self, job: Job) -> Result<(), WorkerError> {
        let jobs = self.jobs.as_ref().ok_or(WorkerError::Stopped)?;
        jobs.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => WorkerError::Full,
            mpsc::TrySendError::Disconnected(_) => WorkerError::Stopped,
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut trainer: Trainer,
    jobs: mpsc::Receiver<Job>,
    replies: &async_mpsc::Sender<Reply>,
    faults: &Faults,
    stopping: &AtomicBool,
) {
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let seconds = || started.elapsed().as_secs_f64();
        let reply = match job {
            Job::Train { steps } => train(&mut trainer, steps, faults, stopping).map(Done::Trained),
            Job::SetParams(values) => {
                trainer.set_flat(&values).map(|()| Done::ParamsSet).map_err(WorkerError::Params)
            }
            Job::Shift(delta) => {
                trainer.shift_flat(&delta).map(|()| Done::ParamsSet).map_err(WorkerError::Params)
            }
            Job::Evaluate => {
                let metrics = trainer.evaluate();
                Ok(Done::Evaluated { metrics, seconds: seconds() })
            }
            Job::Checkpoint { dir, options, strategy } => trainer
                .save_checkpoint(&dir, options, strategy.as_ref())
                .map(|()| Done::Checkpointed { steps: trainer.steps_done(), seconds: seconds() })
                .map_err(|source| WorkerError::Checkpoint { dir, source }),
        };
        // The driver has stopped listening: nothing is left to tell.
        if replies.blocking_send(reply).is_err() {
            break;
        }
    }
}

fn train(
    trainer: &mut Trainer,
    steps: u64,
    faults: &Faults,
    stopping: &AtomicBool,
) -> Result<PhaseDone, WorkerError> {
    let started = Instant::now();
    let (mut loss, mut ran) = (0.0, 0);
    while ran < steps && !stopping.load(Ordering::Relaxed) {
        sit_out_pause(faults);
        trainer.set_label_flip(faults.label_flip(Instant::now()));
        loss += trainer.step().map_err(WorkerError::Train)?.loss;
        ran += 1;
    }
    let params = trainer.model.params().map_err(WorkerError::Params)?.values;
    Ok(PhaseDone {
        params,
        loss: loss / ran.max(1) as f64,
        samples: ran * trainer.examples_per_step(),
        steps_done: trainer.steps_done(),
        started,
        seconds: started.elapsed().as_secs_f64(),
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
