//! The shared-memory data plane. A client on the same host connects to a second Unix
//! socket (mode 0600), says hello with its token, and receives two descriptors over
//! `SCM_RIGHTS`: the G2 pool's memfd, **read-only** (opened again through `/proc/self/fd`,
//! and sealed against resizing and any new write or writable mapping, so a client cannot
//! change or truncate other blocks even by reopening it), and a private staging memfd
//! (size-sealed) of a few
//! slots it writes blocks into for `Put`. `Get` with the session id then answers with slot
//! offsets into the pool instead of bytes, under a lease: a leased page is never evicted,
//! so its slot is not reused until the client releases the lease, the lease expires, or the
//! session's socket closes (the client exited), whichever comes first.
//!
//! Handshake (one line each way, then the socket stays open for the session's life):
//! client `STRATA-SHM 1 <token or ->\n`; server a JSON line, with the descriptors attached
//! on success: `{"session":N,"pool_bytes":..,"slot_size":..,"staging_slots":..,
//! "block_bytes":..}` or `{"error":"..."}`.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::Arc;

use memmap2::{Mmap, MmapMut, MmapOptions};
use serde::{Deserialize, Serialize};

use crate::state::{Owner, Shared};

/// A client's shared-memory session, server side.
pub struct ShmSession {
    /// Session id (sent with `Put`/`Get`).
    pub id: u64,
    /// Tenant that opened it.
    pub tenant: String,
    staging: MmapMut,
    /// Staging slots.
    pub slots: u32,
    /// Bytes per staging slot (the pool's slot size).
    pub slot_size: usize,
}

impl ShmSession {
    /// Copies staging slot `i` (its first `len` bytes) out of the shared mapping. The
    /// client may write the slot concurrently; a copy through raw pointers never hands a
    /// reference to memory another process is changing to safe code.
    pub fn copy_slot(&self, i: u32, len: usize) -> Option<Vec<u8>> {
        if i >= self.slots || len > self.slot_size {
            return None;
        }
        let mut out = vec![0u8; len];
        // SAFETY: slot i lies within the mapping (i < slots, len <= slot_size, the mapping
        // is slots × slot_size bytes); `out` is a distinct allocation of len bytes. The
        // bytes may change underneath (another process), which a byte copy tolerates.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.staging.as_ptr().add(i as usize * self.slot_size),
                out.as_mut_ptr(),
                len,
            );
        }
        Some(out)
    }
}

/// The server's hello answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Session id.
    #[serde(default)]
    pub session: u64,
    /// Bytes of the pool mapping.
    #[serde(default)]
    pub pool_bytes: u64,
    /// Bytes per slot (pool and staging).
    #[serde(default)]
    pub slot_size: u64,
    /// Staging slots of this session.
    #[serde(default)]
    pub staging_slots: u32,
    /// Bytes of one block.
    #[serde(default)]
    pub block_bytes: u64,
    /// Why the session was refused.
    #[serde(default)]
    pub error: Option<String>,
}

fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: cname is a valid NUL-terminated string; flags are valid.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    f.set_len(len)?;
    // The size is fixed before the client gets the descriptor: it cannot shrink the file
    // under the server's mapping (which would make the server's reads fault).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own with a valid command and argument.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f.into())
}

/// Sends `data` with `fds` attached (`SCM_RIGHTS`).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one cmsg carrying
        // fds.len() descriptors; CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), fd_bytes);
        }
    }
    // SAFETY: msg describes valid buffers that outlive the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::other("short write of the shared-memory hello"));
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and up to `max_fds` descriptors.
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: pure size computation.
    let space =
        unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg points at buffers valid for the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed cmsgs within msg_controllen;
    // CMSG_NXTHDR stops at its end. Each SCM_RIGHTS payload is an array of new descriptors
    // this process now owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, fds))
}

/// Serves one shared-memory connection until the client goes away or the sidecar shuts
/// down. The session's leases are released when it returns.
pub async fn serve_session(shared: Arc<Shared>, stream: tokio::net::UnixStream) {
    if let Err(e) = serve_session_inner(&shared, stream).await {
        tracing::debug!("shared-memory session ended: {e}");
    }
}

async fn send_line(
    stream: &tokio::net::UnixStream,
    hello: &Hello,
    fds: &[RawFd],
) -> io::Result<()> {
    let mut line = serde_json::to_vec(hello).map_err(io::Error::other)?;
    line.push(b'\n');
    stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            send_with_fds(stream.as_raw_fd(), &line, fds)
        })
        .await
}

fn refusal(msg: String) -> Hello {
    Hello {
        session: 0,
        pool_bytes: 0,
        slot_size: 0,
        staging_slots: 0,
        block_bytes: 0,
        error: Some(msg),
    }
}

async fn serve_session_inner(
    shared: &Arc<Shared>,
    mut stream: tokio::net::UnixStream,
) -> io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    {
        let mut r = tokio::io::BufReader::new((&mut stream).take(4096));
        tokio::time::timeout(std::time::Duration::from_secs(10), r.read_line(&mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello within 10 s"))??;
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    if parts.next() != Some("STRATA-SHM") || parts.next() != Some("1") {
        let h = refusal("expected `STRATA-SHM 1 <token or ->`".into());
        return send_line(&stream, &h, &[]).await;
    }
    let token = parts.next().unwrap_or("-");
    let header = format!("Bearer {token}");
    let tenant = match shared
        .auth
        .tenant((token != "-").then_some(header.as_bytes()))
    {
        Ok(t) => t,
        Err(e) => return send_line(&stream, &refusal(e.to_string()), &[]).await,
    };
    if !tenant.shm {
        let msg = format!(
            "tenant {} may not map the shared pool (set shm = true for it)",
            tenant.name
        );
        return send_line(&stream, &refusal(msg), &[]).await;
    }
    let Some(_held) =
        crate::auth::Held::take(&tenant, |u| &u.shm_sessions, tenant.quota.shm_sessions())
    else {
        let msg = format!(
            "tenant {} has {} shared-memory sessions open already (quota.shm_sessions)",
            tenant.name,
            tenant.quota.shm_sessions()
        );
        return send_line(&stream, &refusal(msg), &[]).await;
    };
    if shared.sessions.len() >= shared.cfg.max_shm_sessions {
        let msg = format!(
            "{} shared-memory sessions are open already (max_shm_sessions)",
            shared.cfg.max_shm_sessions
        );
        return send_line(&stream, &refusal(msg), &[]).await;
    }
    let Some(pool_fd) = shared.host.memfd() else {
        let h = refusal("the host pool is not shareable".into());
        return send_line(&stream, &h, &[]).await;
    };
    // A read-only descriptor of the same memory: the client cannot map it writable.
    let ro = std::fs::OpenOptions::new()
        .read(true)
        .open(format!("/proc/self/fd/{pool_fd}"))?;
    let slot_size = shared.host.slot_size();
    let slots = shared.cfg.shm_staging_slots;
    let staging_fd = memfd("strata-staging", slots as u64 * slot_size as u64)?;
    // SAFETY: the memfd was sized above and is shared only with this session's client,
    // whose writes the server only ever copies out through raw pointers (copy_slot).
    let staging = unsafe { MmapOptions::new().map_mut(&staging_fd)? };
    let id = shared.next_id();
    let hello = Hello {
        session: id,
        pool_bytes: shared.host.slots() as u64 * slot_size as u64,
        slot_size: slot_size as u64,
        staging_slots: slots,
        block_bytes: shared.cache.block_bytes() as u64,
        error: None,
    };
    shared.sessions.insert(
        id,
        Arc::new(ShmSession {
            id,
            tenant: tenant.name.clone(),
            staging,
            slots,
            slot_size,
        }),
    );
    let sent = send_line(&stream, &hello, &[ro.as_raw_fd(), staging_fd.as_raw_fd()]).await;
    drop((ro, staging_fd));
    if sent.is_ok() {
        // The session lasts as long as the client keeps the socket open.
        let mut rx = shared.shutdown.subscribe();
        let mut sink = [0u8; 64];
        loop {
            tokio::select! {
                r = stream.read(&mut sink) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = rx.changed() => break,
            }
        }
    }
    shared.sessions.remove(&id);
    shared.release_owned(Owner::Session(id));
    sent
}

/// A client's side of a shared-memory session: the pool mapped read-only and its staging
/// slots mapped read-write. Dropping it ends the session (the server releases its leases).
pub struct ShmClient {
    _sock: StdUnixStream,
    pool: Mmap,
    staging: MmapMut,
    hello: Hello,
}

/// Why a shared-memory session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// Socket or mapping failure.
    #[error("shared-memory session: {0}")]
    Io(#[from] io::Error),
    /// The server said no.
    #[error("shared-memory session refused: {0}")]
    Refused(String),
    /// The server's answer made no sense.
    #[error("shared-memory session: bad answer from server: {0}")]
    Protocol(String),
}

impl ShmClient {
    /// Opens a session on the sidecar's shared-memory socket.
    pub fn connect(path: &Path, token: Option<&str>) -> Result<Self, ShmError> {
        let sock = StdUnixStream::connect(path)?;
        let tok = token.unwrap_or("-");
        if tok.is_empty() || tok.contains(char::is_whitespace) {
            return Err(ShmError::Refused(
                "token is empty or contains whitespace".into(),
            ));
        }
        (&sock).write_all(format!("STRATA-SHM 1 {tok}\n").as_bytes())?;
        let mut buf = vec![0u8; 4096];
        let (n, fds) = recv_with_fds(sock.as_raw_fd(), &mut buf, 2)?;
        let text = std::str::from_utf8(&buf[..n]).map_err(|e| ShmError::Protocol(e.to_string()))?;
        let hello: Hello =
            serde_json::from_str(text.trim_end()).map_err(|e| ShmError::Protocol(e.to_string()))?;
        if let Some(e) = hello.error {
            return Err(ShmError::Refused(e));
        }
        let [pool_fd, staging_fd]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|_| ShmError::Protocol("expected two descriptors".into()))?;
        let stg_len = hello.staging_slots as u64 * hello.slot_size;
        // SAFETY: the server sized the memfd to pool_bytes; the mapping is read-only, and
        // the bytes of a slot are read only while the client holds its lease.
        let pool = unsafe {
            MmapOptions::new()
                .len(hello.pool_bytes as usize)
                .map(&pool_fd)?
        };
        // SAFETY: the staging memfd is private to this session and sized by the server.
        let staging = unsafe {
            MmapOptions::new()
                .len(stg_len as usize)
                .map_mut(&staging_fd)?
        };
        Ok(ShmClient {
            _sock: sock,
            pool,
            staging,
            hello,
        })
    }

    /// Session id to send with `Put` and `Get`.
    pub fn session(&self) -> u64 {
        self.hello.session
    }

    /// Staging slots available for `Put`.
    pub fn staging_slots(&self) -> u32 {
        self.hello.staging_slots
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.hello.block_bytes as usize
    }

    /// The block at `offset` in the pool (`len` bytes), as `Get` returned it. Valid while
    /// the lease that came with it holds.
    pub fn block(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        self.pool.get(offset as usize..end as usize)
    }

    /// Staging slot `i`, to write a block into before `Put`.
    pub fn staging_mut(&mut self, i: u32) -> Option<&mut [u8]> {
        if i >= self.hello.staging_slots {
            return None;
        }
        let ss = self.hello.slot_size as usize;
        let bb = self.hello.block_bytes as usize;
        self.staging.get_mut(i as usize * ss..i as usize * ss + bb)
    }
}
