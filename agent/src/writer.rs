//! The one writer. The reconcile loop holds the reconciler through this and
//! nothing else touches it: every change to the kernel maps goes through
//! here, and each change to what the snapshot holds (services, backends,
//! drains) is published to the read side (`View`) once made. Health words
//! and the FIB generation are read from the kernel, so their writes publish
//! nothing.

use std::{sync::Arc, time::Instant};

use anyhow::Result;

use crate::{
    config::ServiceSpec,
    reconcile::{Adopted, Reconciler},
    view::View,
};

pub struct Writer {
    reconciler: Reconciler,
    view: Arc<View>,
}

impl Writer {
    /// Takes the reconciler and opens the read side on the same maps.
    pub fn new(reconciler: Reconciler) -> Result<Self> {
        let view = Arc::new(View::new(
            reconciler.read_side()?,
            reconciler.read_tables()?,
        ));
        Ok(Self { reconciler, view })
    }

    /// The read side, for the tasks that only read.
    pub fn view(&self) -> Arc<View> {
        self.view.clone()
    }

    /// The reconciler, for reads within the loop (the readmitter's scan).
    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    /// Takes over the services a pinned datapath holds.
    pub fn adopt(&mut self, config: &[ServiceSpec]) -> Result<Adopted> {
        let adopted = self.reconciler.adopt(config);
        self.publish();
        adopted
    }

    /// Makes the maps hold `desired`. Published even when it fails: what
    /// was applied before the failure is what the kernel serves.
    pub fn apply(&mut self, desired: &[ServiceSpec]) -> Result<()> {
        let applied = self.reconciler.apply(desired);
        self.publish();
        applied
    }

    /// Ends the drains that are over (see `Reconciler::finish_drains`).
    pub fn finish_drains(&mut self, now: Instant) {
        if self.reconciler.finish_drains(Some(now)) {
            self.publish();
        }
    }

    /// Ends an ejection.
    pub fn readmit(&mut self, backend_id: u32) -> Result<()> {
        self.reconciler.readmit(backend_id)
    }

    pub fn recount_ejected(&mut self) -> Result<()> {
        self.reconciler.recount_ejected()
    }

    /// See `Reconciler::resolve_dsr_neighbours`.
    pub fn resolve_dsr_neighbours(&mut self) {
        self.reconciler.resolve_dsr_neighbours();
    }

    pub fn bump_fib_generation(&mut self) -> Result<()> {
        self.reconciler.bump_fib_generation()
    }

    fn publish(&self) {
        self.view.publish(self.reconciler.services.clone());
    }
}
