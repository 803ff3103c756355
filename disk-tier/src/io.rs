//! I/O engines: positional reads and writes of aligned buffers that the engine owns until
//! the kernel is done with them.
//!
//! A request hands its [`AlignedBuf`] to the engine and gets it back with the result. If
//! the waiting future is dropped (the caller was cancelled), the engine still holds the
//! buffer until the completion arrives and only then frees it, so the kernel never writes
//! into freed memory (the bug foyer fixed in its issue #1286).
//!
//! - [`UringEngine`]: one thread owns an io_uring. It drains every queued request into
//!   submission entries (up to the queue depth), submits them in one call, and sleeps in
//!   the kernel until a completion or a doorbell (an eventfd read that producers ring)
//!   arrives. It never spins when idle.
//! - [`PsyncEngine`]: a few threads doing `pread`/`pwrite`; the fallback where io_uring is
//!   missing or disabled.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender, unbounded};
use tokio::sync::oneshot;

/// A zeroed heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two); `len` is rounded up to `align`.
    pub fn new(len: usize, align: usize) -> Self {
        let len = len.div_ceil(align).max(1) * align;
        let layout = Layout::from_size_align(len, align).expect("valid aligned layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, align }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: lengths are at least one alignment unit).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, self.align),
            )
        }
    }
}

/// The result of one I/O: the buffer comes back either way.
pub type IoResult = (AlignedBuf, io::Result<()>);

/// A future resolving to an [`IoResult`].
pub type IoFuture = Pin<Box<dyn Future<Output = IoResult> + Send>>;

/// Work the engine runs when a write has finished in the kernel (or is known never to
/// start), before it answers the requester, and whether or not the requester still waits.
pub type OnDone = Box<dyn FnOnce() + Send>;

/// Reads and writes whole aligned buffers at file offsets.
pub trait IoEngine: Send + Sync {
    /// Engine name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Reads `buf.len()` bytes at `offset` of file `file`.
    fn read(&self, file: usize, offset: u64, buf: AlignedBuf) -> IoFuture;
    /// Writes all of `buf` at `offset` of file `file`.
    fn write(&self, file: usize, offset: u64, buf: AlignedBuf) -> IoFuture {
        self.write_then(file, offset, buf, Box::new(|| {}))
    }
    /// Like `write`, and runs `on_done` once the write is over in the kernel (also when the
    /// requester has gone), before the result is sent.
    fn write_then(&self, file: usize, offset: u64, buf: AlignedBuf, on_done: OnDone) -> IoFuture;
    /// Requests submitted and not yet completed.
    fn in_flight(&self) -> usize;
}

/// Which engine to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else psync.
    #[default]
    Auto,
    /// io_uring or fail.
    IoUring,
    /// Positional read/write from worker threads.
    Psync,
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
}

struct Request {
    op: Op,
    fd: RawFd,
    offset: u64,
    buf: AlignedBuf,
    done: oneshot::Sender<IoResult>,
    on_done: Option<OnDone>,
}

impl Request {
    /// Runs `on_done` (the I/O is over), then answers the requester.
    fn complete(mut self, r: io::Result<()>) {
        if let Some(f) = self.on_done.take() {
            f();
        }
        let _ = self.done.send((self.buf, r));
    }
}

fn wait_for(rx: oneshot::Receiver<IoResult>) -> IoFuture {
    Box::pin(async move {
        match rx.await {
            Ok(r) => r,
            // The engine thread died: report it; the buffer is gone with it.
            Err(_) => (
                AlignedBuf::new(1, 1),
                Err(io::Error::other("I/O engine stopped")),
            ),
        }
    })
}

/// Hands a request to an engine's queue. On failure (no such file, engine stopped) returns
/// a ready future that gives the buffer back with the error.
#[allow(clippy::too_many_arguments)]
fn enqueue(
    files: &[RawFd],
    tx: Option<&Sender<Request>>,
    in_flight: &AtomicUsize,
    op: Op,
    file: usize,
    offset: u64,
    buf: AlignedBuf,
    on_done: Option<OnDone>,
) -> Result<oneshot::Receiver<IoResult>, IoFuture> {
    let (done, rx) = oneshot::channel();
    let fail = |buf: AlignedBuf, on_done: Option<OnDone>, msg: &'static str| -> IoFuture {
        // Nothing reached the kernel: the write is over before it started.
        if let Some(f) = on_done {
            f();
        }
        Box::pin(async move { (buf, Err(io::Error::other(msg))) })
    };
    let Some(&fd) = files.get(file) else {
        return Err(fail(buf, on_done, "no such file"));
    };
    let Some(tx) = tx else {
        return Err(fail(buf, on_done, "I/O engine stopped"));
    };
    in_flight.fetch_add(1, Ordering::AcqRel);
    let req = Request {
        op,
        fd,
        offset,
        buf,
        done,
        on_done,
    };
    if let Err(e) = tx.send(req) {
        in_flight.fetch_sub(1, Ordering::AcqRel);
        let mut r = e.into_inner();
        let on_done = r.on_done.take();
        return Err(fail(r.buf, on_done, "I/O engine stopped"));
    }
    Ok(rx)
}

fn full_io(op: Op, fd: RawFd, offset: u64, buf: &mut AlignedBuf) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = buf.len() - done;
        // SAFETY: the pointer range [done, len) lies inside `buf`, which we own mutably for
        // the call; `fd` is an open descriptor held by the engine.
        let n = unsafe {
            let p = buf.as_mut_ptr().add(done);
            match op {
                Op::Read => libc::pread(fd, p.cast(), rest, (offset + done as u64) as i64),
                Op::Write => libc::pwrite(fd, p.cast(), rest, (offset + done as u64) as i64),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(match op {
                Op::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"),
                Op::Write => io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"),
            });
        }
        done += n as usize;
    }
    Ok(())
}

/// Worker threads doing `pread`/`pwrite`.
pub struct PsyncEngine {
    files: Vec<RawFd>,
    tx: Option<Sender<Request>>,
    workers: Vec<JoinHandle<()>>,
    in_flight: Arc<AtomicUsize>,
}

impl PsyncEngine {
    /// `threads` workers over `files` (kept open by the caller for the engine's life).
    pub fn new(files: &[File], threads: usize) -> Self {
        let (tx, rx): (Sender<Request>, Receiver<Request>) = unbounded();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let workers = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                let in_flight = in_flight.clone();
                std::thread::Builder::new()
                    .name(format!("strata-psync-{i}"))
                    .spawn(move || {
                        while let Ok(mut r) = rx.recv() {
                            let res = full_io(r.op, r.fd, r.offset, &mut r.buf);
                            in_flight.fetch_sub(1, Ordering::AcqRel);
                            r.complete(res);
                        }
                    })
                    .expect("spawn psync worker")
            })
            .collect();
        PsyncEngine {
            files: files.iter().map(|f| f.as_raw_fd()).collect(),
            tx: Some(tx),
            workers,
            in_flight,
        }
    }

    fn submit(
        &self,
        op: Op,
        file: usize,
        offset: u64,
        buf: AlignedBuf,
        on_done: Option<OnDone>,
    ) -> IoFuture {
        match enqueue(
            &self.files,
            self.tx.as_ref(),
            &self.in_flight,
            op,
            file,
            offset,
            buf,
            on_done,
        ) {
            Ok(rx) => wait_for(rx),
            Err(failed) => failed,
        }
    }
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }
    fn read(&self, file: usize, offset: u64, buf: AlignedBuf) -> IoFuture {
        self.submit(Op::Read, file, offset, buf, None)
    }
    fn write_then(&self, file: usize, offset: u64, buf: AlignedBuf, on_done: OnDone) -> IoFuture {
        self.submit(Op::Write, file, offset, buf, Some(on_done))
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One thread driving an io_uring. See the module docs.
pub struct UringEngine {
    files: Vec<RawFd>,
    tx: Option<Sender<Request>>,
    doorbell: Arc<OwnedFd>,
    /// Set by the ring thread while it may sleep in the kernel: only then do producers ring
    /// the doorbell (one eventfd write per sleep, not per request).
    sleeping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    in_flight: Arc<AtomicUsize>,
    /// Submit calls made (each may carry many requests): for the batching metric.
    pub submits: Arc<AtomicU64>,
}

const DOORBELL: u64 = u64::MAX;

impl UringEngine {
    /// An engine with `queue_depth` submission entries over `files`.
    pub fn new(files: &[File], queue_depth: u32) -> io::Result<Self> {
        let qd = queue_depth.clamp(1, 4096);
        let ring = io_uring::IoUring::new((qd + 1).next_power_of_two())?;
        // SAFETY: eventfd with valid flags; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let doorbell = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = unbounded::<Request>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let submits = Arc::new(AtomicU64::new(0));
        let sleeping = Arc::new(AtomicBool::new(false));
        let thread = {
            let doorbell = doorbell.clone();
            let in_flight = in_flight.clone();
            let submits = submits.clone();
            let sleeping = sleeping.clone();
            std::thread::Builder::new()
                .name("strata-uring".into())
                .spawn(move || {
                    uring_loop(
                        ring,
                        rx,
                        doorbell,
                        sleeping,
                        qd as usize,
                        in_flight,
                        submits,
                    )
                })?
        };
        Ok(UringEngine {
            files: files.iter().map(|f| f.as_raw_fd()).collect(),
            tx: Some(tx),
            doorbell,
            sleeping,
            thread: Some(thread),
            in_flight,
            submits,
        })
    }

    fn ring_doorbell(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.doorbell.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn submit(
        &self,
        op: Op,
        file: usize,
        offset: u64,
        buf: AlignedBuf,
        on_done: Option<OnDone>,
    ) -> IoFuture {
        let rx = match enqueue(
            &self.files,
            self.tx.as_ref(),
            &self.in_flight,
            op,
            file,
            offset,
            buf,
            on_done,
        ) {
            Ok(rx) => rx,
            Err(failed) => return failed,
        };
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.ring_doorbell();
        }
        wait_for(rx)
    }
}

fn uring_loop(
    mut ring: io_uring::IoUring,
    rx: Receiver<Request>,
    doorbell: Arc<OwnedFd>,
    sleeping: Arc<AtomicBool>,
    qd: usize,
    in_flight: Arc<AtomicUsize>,
    submits: Arc<AtomicU64>,
) {
    use io_uring::{opcode, types};
    let mut pending: HashMap<u64, Request> = HashMap::new();
    let mut backlog: std::collections::VecDeque<Request> = Default::default();
    let mut next_id: u64 = 0;
    let mut bell_buf = Box::new(0u64);
    let mut bell_armed = false;
    let mut closed = false;
    loop {
        // Take every queued request, up to the queue depth.
        loop {
            match rx.try_recv() {
                Ok(r) => backlog.push_back(r),
                Err(crossbeam::channel::TryRecvError::Empty) => break,
                Err(crossbeam::channel::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // Arm the doorbell so new requests wake us while we wait in the kernel.
        if !bell_armed && !closed {
            let e = opcode::Read::new(
                types::Fd(doorbell.as_raw_fd()),
                (&mut *bell_buf as *mut u64).cast(),
                8,
            )
            .build()
            .user_data(DOORBELL);
            // SAFETY: `bell_buf` is a boxed u64 that outlives the ring (dropped after the
            // loop ends, and the loop only ends when nothing is in flight).
            if unsafe { ring.submission().push(&e) }.is_ok() {
                bell_armed = true;
            }
        }
        while pending.len() < qd {
            let Some(mut r) = backlog.pop_front() else {
                break;
            };
            let id = next_id;
            next_id += 1;
            let len = r.buf.len() as u32;
            let ptr = r.buf.as_mut_ptr();
            let e = match r.op {
                Op::Read => opcode::Read::new(types::Fd(r.fd), ptr, len)
                    .offset(r.offset)
                    .build(),
                Op::Write => opcode::Write::new(types::Fd(r.fd), ptr, len)
                    .offset(r.offset)
                    .build(),
            }
            .user_data(id);
            // SAFETY: the buffer is owned by `r`, which stays in `pending` until its
            // completion is reaped, even if the requester has gone away.
            if unsafe { ring.submission().push(&e) }.is_err() {
                backlog.push_front(r);
                break;
            }
            pending.insert(id, r);
        }
        if closed && pending.is_empty() && backlog.is_empty() {
            break;
        }
        // About to sleep: from here on a producer must ring. A request that arrived before
        // the flag was set is seen by the check below instead.
        sleeping.store(true, Ordering::SeqCst);
        let want = if rx.is_empty() || pending.len() >= qd {
            1
        } else {
            0
        };
        // Sleep in the kernel until at least one completion (a request or the doorbell).
        let r = ring.submit_and_wait(want);
        sleeping.store(false, Ordering::SeqCst);
        match r {
            Ok(_) => {
                submits.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // Transient: reap what has completed and try again.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::ENOMEM)
                ) => {}
            Err(e) => {
                // The ring is unusable. Requests already submitted may still be running in
                // the kernel, so their buffers are never handed back or freed (leaked on
                // purpose); their requesters get an error with a stand-in buffer.
                tracing::error!(error = %e, "io_uring failed; the disk tier's I/O stops");
                for (_, r) in pending.drain() {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    // Its `on_done` is not run either: the write may still land.
                    let Request {
                        buf, done, on_done, ..
                    } = r;
                    std::mem::forget(buf);
                    std::mem::forget(on_done);
                    let _ = done.send((
                        AlignedBuf::new(1, 1),
                        Err(io::Error::new(e.kind(), e.to_string())),
                    ));
                }
                for r in backlog.drain(..) {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    r.complete(Err(io::Error::other("I/O engine stopped")));
                }
                std::mem::forget(ring);
                std::mem::forget(bell_buf);
                return;
            }
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in done {
            if id == DOORBELL {
                bell_armed = false;
                continue;
            }
            let Some(r) = pending.remove(&id) else {
                continue;
            };
            let want = r.buf.len();
            let out = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if (res as usize) < want {
                // Finish a short transfer synchronously (rare with O_DIRECT).
                finish_short(r.op, res as usize, want)
            } else {
                Ok(())
            };
            in_flight.fetch_sub(1, Ordering::AcqRel);
            r.complete(out);
        }
    }
    // The doorbell read may still be armed; the ring is dropped (and its requests
    // cancelled) before `bell_buf`, which is declared earlier.
    drop(ring);
    drop(bell_buf);
}

fn finish_short(op: Op, got: usize, want: usize) -> io::Result<()> {
    // O_DIRECT transfers are all or nothing on a healthy device; a short one is an error
    // (finishing it would need an aligned remainder, which a short count rarely is).
    Err(io::Error::new(
        match op {
            Op::Read => io::ErrorKind::UnexpectedEof,
            Op::Write => io::ErrorKind::WriteZero,
        },
        format!("short transfer: {got} of {want} bytes"),
    ))
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn read(&self, file: usize, offset: u64, buf: AlignedBuf) -> IoFuture {
        self.submit(Op::Read, file, offset, buf, None)
    }
    fn write_then(&self, file: usize, offset: u64, buf: AlignedBuf, on_done: OnDone) -> IoFuture {
        self.submit(Op::Write, file, offset, buf, Some(on_done))
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.tx.take();
        self.ring_doorbell();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Builds the engine asked for. With `Auto`, falls back to psync (and says why) when
/// io_uring cannot be set up.
pub fn build_engine(
    kind: EngineKind,
    files: &[File],
    queue_depth: u32,
) -> io::Result<Arc<dyn IoEngine>> {
    match kind {
        EngineKind::Psync => Ok(Arc::new(PsyncEngine::new(
            files,
            queue_depth.clamp(1, 16) as usize,
        ))),
        EngineKind::IoUring => Ok(Arc::new(UringEngine::new(files, queue_depth)?)),
        EngineKind::Auto => match UringEngine::new(files, queue_depth) {
            Ok(e) => Ok(Arc::new(e)),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; the disk tier uses psync");
                Ok(Arc::new(PsyncEngine::new(
                    files,
                    queue_depth.clamp(1, 16) as usize,
                )))
            }
        },
    }
}
