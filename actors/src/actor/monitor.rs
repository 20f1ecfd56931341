//! HallucinationMonitor: owns the [`HallucinationMonitor`] state (sliding window, probe results,
//! calibration and its change log).
//!
//! - [`ObserveStep`]: a training step's hallucination flags and per-sample signals; the reply carries the
//!   `hallucination/*` and `calibration/*` metrics and, when the rate passed its bound, a
//!   [`CalibrationChange`] for the reward combiner (bounded step, with its reason).
//! - [`ObserveProbe`]: the flags of a probe-set run through the generator.
//! - [`MonitorSnapshot`]: the whole state for a checkpoint.
//!
//! Bookkeeping only: it runs on an ordinary arbiter. A handler that panics replies an error naming the
//! message (the controller then ends the run with it).

use actix::{Actor, Context, Handler};

use super::{handle_guarded, Closed, Liveness};
use crate::monitor::HallucinationMonitor;
use crate::protocol::{
    ActorName, CalibrationChange, Heartbeat, HeartbeatReply, MonitorReport, MonitorSnapshot,
    ObserveProbe, ObserveStep, Shutdown,
};
use crate::Result;

/// The monitor actor.
pub struct MonitorActor {
    monitor: HallucinationMonitor,
    liveness: Liveness,
    closed: Closed,
}

impl MonitorActor {
    /// Wraps a fresh or resumed monitor.
    pub fn new(monitor: HallucinationMonitor) -> Self {
        Self {
            monitor,
            liveness: Liveness::new(ActorName::HallucinationMonitor),
            closed: Closed::default(),
        }
    }
}

impl Actor for MonitorActor {
    type Context = Context<Self>;
}

impl Handler<ObserveStep> for MonitorActor {
    type Result = Result<MonitorReport>;

    fn handle(&mut self, msg: ObserveStep, _: &mut Context<Self>) -> Self::Result {
        let Self {
            monitor,
            liveness,
            closed,
        } = self;
        handle_guarded(liveness, closed, "ObserveStep", || {
            monitor.observe_step(msg.step, &msg.observation)?;
            let calibrate = monitor.calibrate(msg.step).map(|change| {
                tracing::warn!(step = msg.step, "calibration: {}", change.reason);
                CalibrationChange {
                    calibration: change.new,
                    reason: change.reason,
                }
            });
            Ok(MonitorReport {
                metrics: monitor.metrics(),
                calibrate,
            })
        })
    }
}

impl Handler<ObserveProbe> for MonitorActor {
    type Result = Result<()>;

    fn handle(&mut self, msg: ObserveProbe, _: &mut Context<Self>) -> Result<()> {
        let Self {
            monitor,
            liveness,
            closed,
        } = self;
        handle_guarded(liveness, closed, "ObserveProbe", || {
            monitor.observe_probe(msg.step, &msg.flags);
            Ok(())
        })
    }
}

impl Handler<MonitorSnapshot> for MonitorActor {
    type Result = Result<HallucinationMonitor>;

    fn handle(&mut self, _: MonitorSnapshot, _: &mut Context<Self>) -> Self::Result {
        let Self {
            monitor,
            liveness,
            closed,
        } = self;
        handle_guarded(liveness, closed, "MonitorSnapshot", || Ok(monitor.clone()))
    }
}

impl Handler<Shutdown> for MonitorActor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) {
        self.liveness.handling("Shutdown");
        self.closed.close(ActorName::HallucinationMonitor);
    }
}

impl Handler<Heartbeat> for MonitorActor {
    type Result = HeartbeatReply;

    fn handle(&mut self, _: Heartbeat, _: &mut Context<Self>) -> HeartbeatReply {
        self.liveness.reply()
    }
}
