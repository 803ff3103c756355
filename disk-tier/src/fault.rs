//! Fault injection for the I/O path (tests, and the `testing` feature).
//!
//! [`FaultyEngine`] wraps a real engine and, while a fault is switched on, answers reads or
//! writes with the chosen OS error instead of doing them.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::io::{AlignedBuf, IoEngine, IoFuture, OnDone};

/// Switches shared between a test and the engine.
#[derive(Debug, Default)]
pub struct Faults {
    write_errno: AtomicI32,
    read_errno: AtomicI32,
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
