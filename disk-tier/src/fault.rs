//! Fault injection for the I/O path (tests, and the `testing` feature).
//!
//! [`FaultyEngine`] wraps a real engine and, while a fault is switched on, answers reads or
//! writes with the chosen OS error instead of doing them. It can also hold back the answer
//! to a write that is over in the kernel, so that a test decides when its requester resumes
//! (a late completion).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

use crate::io::{AlignedBuf, IoEngine, IoFuture, OnDone};

/// Switches shared between a test and the engine.
#[derive(Debug, Default)]
pub struct Faults {
    write_errno: AtomicI32,
    read_errno: AtomicI32,
    /// Offset + 1 of the next write whose answer is held back (0: none).
    hold_at: AtomicU64,
    held: AtomicUsize,
    released: AtomicBool,
    release: tokio::sync::Notify,
}

impl Faults {
    /// Every write fails with `errno` (0: writes work again). `libc::ENOSPC` for a full
    /// file system.
    pub fn fail_writes(&self, errno: i32) {
        self.write_errno.store(errno, Ordering::SeqCst);
    }

    /// Every read fails with `errno` (0: reads work again). `libc::EIO` for a bad device.
    pub fn fail_reads(&self, errno: i32) {
        self.read_errno.store(errno, Ordering::SeqCst);
    }

    /// The next write at `offset` is done as usual (its completion work runs when the
    /// kernel is done), but its requester gets the answer only after
    /// [`Faults::release_writes`].
    pub fn hold_write_answer(&self, offset: u64) {
        self.released.store(false, Ordering::SeqCst);
        self.hold_at.store(offset + 1, Ordering::SeqCst);
    }

    /// Writes that are over and whose answers are being held back now.
    pub fn held_writes(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Lets every held answer through.
    pub fn release_writes(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

/// An engine that consults [`Faults`] before each request.
pub struct FaultyEngine {
    inner: Arc<dyn IoEngine>,
    faults: Arc<Faults>,
}

impl FaultyEngine {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn IoEngine>, faults: Arc<Faults>) -> Self {
        FaultyEngine { inner, faults }
    }
}

fn fail(buf: AlignedBuf, errno: i32) -> IoFuture {
    Box::pin(async move { (buf, Err(io::Error::from_raw_os_error(errno))) })
}

impl IoEngine for FaultyEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn read(&self, file: usize, offset: u64, buf: AlignedBuf) -> IoFuture {
        match self.faults.read_errno.load(Ordering::SeqCst) {
            0 => self.inner.read(file, offset, buf),
            e => fail(buf, e),
        }
    }
    fn write_then(&self, file: usize, offset: u64, buf: AlignedBuf, on_done: OnDone) -> IoFuture {
        match self.faults.write_errno.load(Ordering::SeqCst) {
            0 if self
                .faults
                .hold_at
                .compare_exchange(offset + 1, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok() =>
            {
                let done = self.inner.write_then(file, offset, buf, on_done);
                let faults = self.faults.clone();
                Box::pin(async move {
                    let r = done.await;
                    faults.held.fetch_add(1, Ordering::SeqCst);
                    loop {
                        let released = faults.release.notified();
                        if faults.released.load(Ordering::SeqCst) {
                            break;
                        }
                        released.await;
                    }
                    faults.held.fetch_sub(1, Ordering::SeqCst);
                    r
                })
            }
            0 => self.inner.write_then(file, offset, buf, on_done),
            e => {
                on_done();
                fail(buf, e)
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}
