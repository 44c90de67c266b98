//! The model's matrix-product thread pool: helpers join a product when they are
//! awake, and nobody waits for a thread that has not started.
//!
//! Why not candle's barrier pool: it is a barrier. Each product hands a slice to
//! every worker and the caller spins until all of them have reported back, so one
//! worker the scheduler has put aside holds the whole product, and the spinning
//! caller takes the very core that worker needs. On a 2-core machine with Whisper,
//! Piper or another call running beside the model that happens all the time: with
//! one busy process beside it, decoding fell from about 50 to 4–7 tokens per second.
//!
//! Here a product is a range of work items behind a shared cursor. The caller takes
//! items until none are left; a helper thread that wakes while items remain takes
//! some too. When the cursor runs out the caller waits only for helpers that are
//! inside the product (they are running, each finishing the item in hand), never for
//! one that is asleep or descheduled. And when a second call's product arrives while
//! one is in progress, it runs on its own thread rather than queueing: two calls
//! then get a core each.
//!
//! Helpers spin briefly between products (a decode step's products come tens of
//! microseconds apart) and then sleep on a condition variable, so an idle model
//! costs nothing.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a helper spins for the next product before it sleeps.
const HELPER_SPIN: Duration = Duration::from_micros(60);
/// How long the caller spins for helpers to finish before it parks.
const CALLER_SPIN: Duration = Duration::from_micros(20);

/// A pool of helper threads for data-parallel loops over work items.
pub struct WorkPool {
    shared: Arc<Shared>,
    helpers: usize,
    /// Set while a product is in progress; a second caller runs alone meanwhile.
    busy: AtomicBool,
}

/// One product in progress, on the caller's stack while any helper may read it.
struct Job<'a> {
    work: &'a (dyn Fn(Range<usize>) + Sync),
    next: AtomicUsize,
    items: usize,
    chunk: usize,
    caller: Thread,
    /// A helper's share of the work panicked (the caller panics in turn, rather
    /// than return a product with items missing).
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Takes chunks of items until none are left.
    fn drain(&self) {
        loop {
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.items {
                return;
            }
            (self.work)(start..self.items.min(start + self.chunk));
        }
    }
}

struct Shared {
    /// The product helpers may join (null: none). Points at a `Job` whose lifetime is
    /// erased; the caller keeps it alive until `inside` is back to zero.
    job: AtomicPtr<Job<'static>>,
    /// Helpers that have announced themselves to the current product.
    inside: AtomicUsize,
    /// Bumped for every product, so sleeping or spinning helpers notice it.
    generation: AtomicUsize,
    /// Helpers asleep on `wake`.
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

impl WorkPool {
    /// A pool whose products run on the caller plus `helpers` threads.
    pub fn new(helpers: usize) -> Self {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            inside: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut started = 0;
        for i in 0..helpers {
            let shared = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("parley-model-{i}"))
                .spawn(move || helper(&shared));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a model helper thread");
                    break;
                }
            }
        }
        Self { shared, helpers: started, busy: AtomicBool::new(false) }
    }

    /// Threads a product can run on: the caller and the helpers.
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Calls `work` on disjoint ranges covering `0..items`, from the caller and any
    /// helper that joins, and returns when every item is done.
    pub fn run<F: Fn(Range<usize>) + Sync>(&self, items: usize, work: F) {
        if items == 0 {
            return;
        }
        // About eight grabs per thread: few trips to the cursor, small tail.
        let chunk = items.div_ceil(self.threads() * 8).max(1);
        if self.helpers == 0
            || items <= chunk
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            work(0..items);
            return;
        }
        let job = Job {
            work: &work,
            next: AtomicUsize::new(0),
            items,
            chunk,
            caller: thread::current(),
            panicked: AtomicBool::new(false),
        };
        let shared = &*self.shared;
        // SAFETY: only the lifetime is erased. The pointer is withdrawn below, and this
        // function does not return until every helper that could have read it has
        // left (`inside == 0`), so no helper touches `job` after it is dropped.
        let erased = unsafe { std::mem::transmute::<*const Job<'_>, *mut Job<'static>>(&job) };
        shared.job.store(erased, Ordering::SeqCst);
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if shared.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }

        {
            // Withdraws the job and waits for the helpers inside it when the caller's
            // share is done, and also if that share panics: `job` must outlive them.
            let _withdraw = Withdraw { pool: self };
            job.drain();
        }
        if job.panicked.load(Ordering::SeqCst) {
            panic!("a model helper thread panicked in a matrix product");
        }
    }
}

/// Closes the current product to latecomers, waits for the helpers inside it, and
/// frees the pool for the next product.
struct Withdraw<'a> {
    pool: &'a WorkPool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let shared = &*self.pool.shared;
        shared.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        let start = Instant::now();
        while shared.inside.load(Ordering::SeqCst) > 0 {
            if start.elapsed() < CALLER_SPIN {
                std::hint::spin_loop();
            } else {
                // A helper that leaves last unparks us; the timeout only bounds a
                // wake-up that raced with our check.
                thread::park_timeout(Duration::from_micros(200));
            }
        }
        self.pool.busy.store(false, Ordering::Release);
    }
}

impl Drop for WorkPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.wake.notify_all();
    }
}

/// A helper's life: wait for a product, join it if it is still open, repeat.
fn helper(shared: &Shared) {
    let mut seen = shared.generation.load(Ordering::SeqCst);
    loop {
        // Spin a little for the next product, then sleep until one comes.
        let start = Instant::now();
        loop {
            let generation = shared.generation.load(Ordering::SeqCst);
            if generation != seen {
                seen = generation;
                break;
            }
            if start.elapsed() < HELPER_SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleeping.fetch_add(1, Ordering::SeqCst);
            let guard = shared
                .wake
                .wait_while(guard, |_| shared.generation.load(Ordering::SeqCst) == seen)
                .unwrap_or_else(|e| e.into_inner());
            shared.sleeping.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        // Announce, then look: a caller that withdrew its job before our announcement
        // does not wait for us, and we see the null; one that withdraws it after sees
        // us inside and waits.
        shared.inside.fetch_add(1, Ordering::SeqCst);
        let job = shared.job.load(Ordering::SeqCst);
        let caller = if job.is_null() {
            None
        } else {
            // SAFETY: the caller keeps the job alive while `inside > 0`.
            let job = unsafe { &*job };
            let drained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.drain()));
            if drained.is_err() {
                // Items of that chunk were left undone: the caller panics in turn.
                job.panicked.store(true, Ordering::SeqCst);
            }
            Some(job.caller.clone())
        };
        if shared.inside.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(caller) = caller
        {
            caller.unpark();
        }
    }
}

/// The process's model pool, sized by [`crate::cpu::model_threads`] on first use.
pub fn model_pool() -> &'static WorkPool {
    static POOL: OnceLock<WorkPool> = OnceLock::new();
    POOL.get_or_init(|| WorkPool::new(crate::cpu::model_threads().saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_of_squares(pool: &WorkPool, items: usize) -> u64 {
        let total = AtomicUsize::new(0);
        let seen = (0..items).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>();
        pool.run(items, |range| {
            for i in range {
                seen[i].fetch_add(1, Ordering::Relaxed);
                total.fetch_add(i * i, Ordering::Relaxed);
            }
        });
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1), "every item exactly once");
        total.load(Ordering::Relaxed) as u64
    }

    #[test]
    fn every_item_runs_exactly_once() {
        let pool = WorkPool::new(3);
        for items in [0, 1, 2, 7, 64, 1000, 4097] {
            let want: u64 = (0..items as u64).map(|i| i * i).sum();
            assert_eq!(sum_of_squares(&pool, items), want, "{items} items");
        }
    }

    #[test]
    fn callers_on_several_threads_share_the_pool() {
        let pool = Arc::new(WorkPool::new(2));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                thread::spawn(move || {
                    for items in 1..300 {
                        let want: u64 = (0..items as u64).map(|i| i * i).sum();
                        assert_eq!(sum_of_squares(&pool, items), want);
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().expect("caller thread");
        }
    }

    #[test]
    fn a_panicking_item_panics_the_caller_and_the_pool_goes_on() {
        let pool = WorkPool::new(2);
        for _ in 0..20 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(1000, |range| {
                    if range.contains(&500) {
                        panic!("item 500");
                    }
                })
            }));
            assert!(r.is_err(), "the panic reaches the caller");
        }
        assert_eq!(sum_of_squares(&pool, 100), (0..100u64).map(|i| i * i).sum::<u64>());
    }

    #[test]
    fn a_product_finishes_when_helpers_sleep() {
        let pool = WorkPool::new(1);
        // Let the helper fall asleep, then run products back to back.
        thread::sleep(Duration::from_millis(5));
        for _ in 0..100 {
            assert_eq!(sum_of_squares(&pool, 50), (0..50u64).map(|i| i * i).sum::<u64>());
        }
    }
}
