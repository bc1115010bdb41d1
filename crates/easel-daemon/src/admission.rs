//! Admission by memory: jobs run side by side only while their predicted needs fit the budget
//! together, so a big job waits for the others to end instead of running beside them.
//!
//! Each job runs in a worker process of its own (see [`crate::worker`]), which maps the
//! weights, builds its model and fills its kernel cache itself: nothing of a job's prediction
//! is shared with another's, so the running jobs' whole peaks are added up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use easel_engine::memory::MemoryPlan;

/// The budget and what the running jobs were admitted with.
pub struct Admission {
    budget: u64,
    running: Mutex<Vec<Need>>,
    freed: Condvar,
    next: AtomicU64,
}

/// What one admitted job's worker holds at its peak (its runtime, weights and kernel cache
/// included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Need {
    id: u64,
    bytes: u64,
}

/// An admitted job's place; dropping it lets waiting jobs in.
pub struct Ticket<'a> {
    admission: &'a Admission,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.admission.lock().retain(|n| n.id != self.id);
        self.admission.freed.notify_all();
    }
}

/// How often a waiting job looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

impl Admission {
    /// Admits jobs within `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self { budget, running: Mutex::new(Vec::new()), freed: Condvar::new(), next: AtomicU64::new(0) }
    }

    /// The budget, in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Need>> {
        // The list is whole whatever a panicking holder did: entries are pushed and removed whole.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `need` fits beside `running`: always when nothing runs (a job was planned to fit
    /// the budget alone).
    fn fits(&self, running: &[Need], need: &Need) -> bool {
        let held: u64 = running.iter().map(|n| n.bytes).sum();
        running.is_empty() || held.saturating_add(need.bytes) <= self.budget
    }

    /// Waits until the job planned as `memory` fits beside the running ones, then admits it;
    /// `waiting` is called once if it has to wait. `None` when `stop` is set while it waits.
    pub fn admit(
        &self,
        memory: &MemoryPlan,
        stop: &AtomicBool,
        waiting: impl FnOnce(),
    ) -> Option<Ticket<'_>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let need = Need { id, bytes: memory.peak_bytes() };
        let mut running = self.lock();
        let mut waiting = Some(waiting);
        while !self.fits(&running, &need) {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(tell) = waiting.take() {
                tell();
            }
            running = self.freed.wait_timeout(running, STOP_CHECK).unwrap_or_else(|e| e.into_inner()).0;
        }
        running.push(need);
        Some(Ticket { admission: self, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_engine::memory::Part;

    fn plan(shared: u64, own: u64) -> MemoryPlan {
        MemoryPlan {
            width: 1,
            height: 1,
            parts: vec![Part { name: "weights", bytes: shared }, Part { name: "evaluation", bytes: own }],
            budget_bytes: 100,
            adjustments: Vec::new(),
            tile_size: None,
            evaluation_bytes: own,
        }
    }

    #[test]
    fn jobs_share_the_budget_and_a_big_one_waits_for_the_others() {
        let admission = Admission::new(100);
        let stop = AtomicBool::new(false);
        let never = || panic!("no wait expected");
        let a = admission.admit(&plan(20, 30), &stop, never).expect("admitted");
        // Each worker holds its own weights: (20 + 30) + (20 + 30) = 100 fits.
        let b = admission.admit(&plan(20, 30), &stop, never).expect("admitted");
        let waited = AtomicBool::new(false);
        std::thread::scope(|s| {
            let c = s.spawn(|| {
                let ticket = admission.admit(&plan(20, 40), &stop, || waited.store(true, Ordering::SeqCst));
                ticket.is_some()
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(!c.is_finished(), "50 + 50 + 60 > 100: the third waits");
            drop(a);
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !c.is_finished(),
                "50 + 60 > 100, though the weights counted once would fit: still waits"
            );
            drop(b);
            assert!(c.join().unwrap(), "alone it runs");
        });
        assert!(waited.load(Ordering::SeqCst));
        // A job larger than the budget is planned to fit alone: it runs when nothing else does.
        assert!(admission.admit(&plan(90, 60), &stop, never).is_some());
    }

    #[test]
    fn a_stop_ends_the_wait() {
        let admission = Admission::new(100);
        let stop = AtomicBool::new(false);
        let _running = admission.admit(&plan(50, 40), &stop, || {}).expect("admitted");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| admission.admit(&plan(50, 40), &stop, || {}).is_none());
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::SeqCst);
            assert!(waiter.join().unwrap(), "the waiting job gives up its place");
        });
    }
}
