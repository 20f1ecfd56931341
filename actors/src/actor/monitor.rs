//! HallucinationMonitor: owns the [`HallucinationMonitor`] state (sliding window, probe results,
//! calibration and its change log).
//!
//! - [`ObserveStep`]: a training step's hallucination flags and per-sample signals; the reply carries the
//!   `hallucination/*` and `calibration/*` metrics and, when the rate passed its bound, a [`Calibrate`] for the
//!   reward combiner (bounded step, with its reason).
//! - [`ObserveProbe`]: the flags of a probe-set run through the generator.
//! - [`MonitorSnapshot`]: the whole state for a checkpoint.
//!
//! Bookkeeping only: it runs on an ordinary arbiter.

use actix::{Actor, Context, Handler, Message};

use super::Liveness;
use crate::monitor::signals::StepObservation;
use crate::monitor::HallucinationMonitor;
use crate::protocol::{Calibrate, Heartbeat, HeartbeatReply};
use crate::verifiers::HallucinationFlags;
use crate::Result;

/// A training step's observation.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<MonitorReport>")]
pub struct ObserveStep {
    /// The training step.
    pub step: u64,
    /// Its flags and samples.
    pub observation: StepObservation,
}

/// A probe-set run's flags, one per probe response that carries them.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ObserveProbe {
    /// The training step it ran at.
    pub step: u64,
    /// The flags.
    pub flags: Vec<HallucinationFlags>,
}

/// Ask for the whole state (for a checkpoint).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "HallucinationMonitor")]
pub struct MonitorSnapshot;

/// Reply to [`ObserveStep`].
#[derive(Debug, Clone)]
pub struct MonitorReport {
    /// `(metric name, value)`, every key on every step (see `HallucinationMonitor::metrics`).
    pub metrics: Vec<(&'static str, f64)>,
    /// A new calibration for the reward combiner, when the monitor moved it at this step.
    pub calibrate: Option<Calibrate>,
}

/// The monitor actor.
pub struct MonitorActor {
    monitor: HallucinationMonitor,
    liveness: Liveness,
}

impl MonitorActor {
    /// Wraps a fresh or resumed monitor.
    pub fn new(monitor: HallucinationMonitor) -> Self {
        Self {
            monitor,
            liveness: Liveness::new("hallucination_monitor"),
        }
    }
}

impl Actor for MonitorActor {
    type Context = Context<Self>;
}

impl Handler<ObserveStep> for MonitorActor {
    type Result = Result<MonitorReport>;

    fn handle(&mut self, msg: ObserveStep, _: &mut Context<Self>) -> Self::Result {
        self.liveness.handling("ObserveStep");
        self.monitor.observe_step(msg.step, &msg.observation)?;
        let calibrate = self.monitor.calibrate(msg.step).map(|change| {
            tracing::warn!(step = msg.step, "calibration: {}", change.reason);
            Calibrate {
                calibration: change.new,
                reason: change.reason,
            }
        });
        Ok(MonitorReport {
            metrics: self.monitor.metrics(),
            calibrate,
        })
    }
}

impl Handler<ObserveProbe> for MonitorActor {
    type Result = ();

    fn handle(&mut self, msg: ObserveProbe, _: &mut Context<Self>) {
        self.liveness.handling("ObserveProbe");
        self.monitor.observe_probe(msg.step, &msg.flags);
    }
}

impl Handler<MonitorSnapshot> for MonitorActor {
    type Result = actix::MessageResult<MonitorSnapshot>;

    fn handle(&mut self, _: MonitorSnapshot, _: &mut Context<Self>) -> Self::Result {
        self.liveness.handling("MonitorSnapshot");
        actix::MessageResult(self.monitor.clone())
    }
}

impl Handler<Heartbeat> for MonitorActor {
    type Result = HeartbeatReply;

    fn handle(&mut self, _: Heartbeat, _: &mut Context<Self>) -> HeartbeatReply {
        self.liveness.reply()
    }
}
