//! What the daemon and its worker processes say to each other over the socket pair that
//! is a worker's stdin: length-prefixed frames (u32 little-endian, then bincode), each
//! length bounded before anything is allocated for it. A worker's messages are input the
//! daemon does not trust: a frame too long or malformed ends that worker.

use super::workers::{Finished, JobResult};
use bincode::{Decode, Encode};
use std::io::{Read, Write};
use vmm::error::ErrorKind;

/// Largest frame either side accepts: a request body (64 MiB at most) or a response
/// (two outputs, each capped by the guest's output limits) with room to spare.
pub(super) const MAX_FRAME: usize = 256 << 20;

/// What a worker process is told once, first.
#[derive(Clone, Debug, Encode, Decode)]
pub(super) struct CellConfig {
    /// This worker's number (logs, thread names).
    pub(super) index: u32,
    pub(super) store_dir: String,
    /// Ready instances per template this worker keeps.
    pub(super) pool: u64,
    pub(super) max_instances: u64,
    pub(super) memory_limit: u64,
    /// `--instance-memory` (see [`super::InstanceMemory::code`]).
    pub(super) instance_memory: u8,
    pub(super) warm: u64,
    /// vCPU threads.
    pub(super) threads: u32,
    pub(super) timeout_ms: u64,
    /// `--seccomp`: on, log or off.
    pub(super) seccomp: String,
}

/// The daemon to a worker.
#[derive(Debug, Encode, Decode)]
pub(super) enum ToCell {
    Config(CellConfig),
    /// Run a request of template `name` with `body` on its stdin.
    Invoke {
        id: u64,
        name: String,
        body: Vec<u8>,
        /// The function's own timeout in ms (0: --timeout).
        timeout_ms: u64,
    },
    /// The client of request `id` went away: stop its guest.
    Cancel {
        id: u64,
    },
}

/// One template's pool in a worker (or, summed, in the daemon).
#[derive(Clone, Debug, Default, Encode, Decode)]
pub(super) struct FunctionStatus {
    pub(super) name: String,
    pub(super) ready: u64,
    pub(super) busy: u64,
    pub(super) served: u64,
    /// New instances share the template's image (else: their own copy).
    pub(super) shared: bool,
    pub(super) maps_memory: bool,
    pub(super) data_pages: u64,
    pub(super) image_bytes: u64,
}

/// The pools of a worker (or of the daemon's own process), read now.
#[derive(Clone, Debug, Default, Encode, Decode)]
pub(super) struct Status {
    pub(super) functions: Vec<FunctionStatus>,
    pub(super) live: u64,
    pub(super) resident: u64,
}

/// A worker to the daemon.
#[derive(Debug, Encode, Decode)]
pub(super) enum FromCell {
    /// The answer to `Invoke { id }`.
    Done { id: u64, result: WireResult },
    /// The pools, and the durations of the resets (seconds) since the last status.
    Status { status: Status, resets: Vec<f32> },
}

/// [`JobResult`] on the wire.
#[derive(Debug, Encode, Decode)]
pub(super) enum WireResult {
    Refused {
        kind: u8,
        msg: String,
    },
    Done {
        /// The exit code, or the failure's kind and message.
        exit: Result<i32, (u8, String)>,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        truncated_stdout: bool,
        truncated_stderr: bool,
        acquire_ms: f64,
        restored_on_demand: bool,
        run_ms: f64,
        exits: u64,
        queue_ms: f64,
    },
}

pub(super) fn kind_code(k: ErrorKind) -> u8 {
    match k {
        ErrorKind::BadRequest => 1,
        ErrorKind::NotFound => 2,
        ErrorKind::Timeout => 3,
        ErrorKind::GuestFault => 4,
        ErrorKind::Damaged => 5,
        ErrorKind::Host => 6,
        ErrorKind::Interrupted => 7,
    }
}

pub(super) fn kind_from(c: u8) -> ErrorKind {
    match c {
        1 => ErrorKind::BadRequest,
        2 => ErrorKind::NotFound,
        3 => ErrorKind::Timeout,
        4 => ErrorKind::GuestFault,
        5 => ErrorKind::Damaged,
        7 => ErrorKind::Interrupted,
        _ => ErrorKind::Host,
    }
}

impl From<JobResult> for WireResult {
    fn from(r: JobResult) -> WireResult {
        match r {
            JobResult::Refused(kind, msg) => WireResult::Refused {
                kind: kind_code(kind),
                msg,
            },
            JobResult::Done(f) => WireResult::Done {
                exit: f.exit.map_err(|(k, m)| (kind_code(k), m)),
                stdout: f.stdout,
                stderr: f.stderr,
                truncated_stdout: f.truncated.stdout,
                truncated_stderr: f.truncated.stderr,
                acquire_ms: f.timings.acquire_ms,
                restored_on_demand: f.timings.restored_on_demand,
                run_ms: f.timings.invoke.run_ms,
                exits: f.timings.invoke.exits,
                queue_ms: f.queue_ms,
            },
        }
    }
}

impl From<WireResult> for JobResult {
    fn from(r: WireResult) -> JobResult {
        match r {
            WireResult::Refused { kind, msg } => JobResult::Refused(kind_from(kind), msg),
            WireResult::Done {
                exit,
                stdout,
                stderr,
                truncated_stdout,
                truncated_stderr,
                acquire_ms,
                restored_on_demand,
                run_ms,
                exits,
                queue_ms,
            } => {
                let mut invoke = Box::<vmm::stats::Stats>::default();
                invoke.run_ms = run_ms;
                invoke.exits = exits;
                JobResult::Done(Finished {
                    exit: exit.map_err(|(k, m)| (kind_from(k), m)),
                    stdout,
                    stderr,
                    truncated: vmm::vm::Truncated {
                        stdout: truncated_stdout,
                        stderr: truncated_stderr,
                    },
                    timings: vmm::pool::Timings {
                        acquire_ms,
                        restored_on_demand,
                        invoke,
                    },
                    queue_ms,
                })
            }
        }
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_FRAME>()
}

/// A message as one frame (length prefix included).
pub(super) fn encode<T: Encode>(msg: &T) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; 4];
    bincode::encode_into_std_write(msg, &mut out, config()).map_err(|e| e.to_string())?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(format!(
            "a message of {len} bytes is over the {MAX_FRAME}-byte bound"
        ));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// A frame's payload length from its prefix, checked against the bound.
pub(super) fn frame_len(prefix: [u8; 4]) -> Result<usize, String> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "a frame of {len} bytes is over the {MAX_FRAME}-byte bound"
        ));
    }
    Ok(len)
}

/// A frame's payload as a message; every byte must be used.
pub(super) fn decode<T: Decode<()>>(payload: &[u8]) -> Result<T, String> {
    let (msg, used) = bincode::decode_from_slice(payload, config())
        .map_err(|e| format!("malformed message: {e}"))?;
    if used != payload.len() {
        return Err(format!("{} bytes after a message", payload.len() - used));
    }
    Ok(msg)
}

/// Read one message (blocking); `None` at a clean end of the stream.
pub(super) fn read_blocking<T: Decode<()>>(r: &mut impl Read) -> Result<Option<T>, String> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err("the stream ended inside a frame's length".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let len = frame_len(prefix)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .map_err(|e| format!("read: {e}"))?;
    decode(&payload).map(Some)
}

/// Write one message (blocking).
pub(super) fn write_blocking<T: Encode>(w: &mut impl Write, msg: &T) -> Result<(), String> {
    let frame = encode(msg)?;
    w.write_all(&frame).map_err(|e| format!("write: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_the_wire_and_damaged_frames_are_refused() {
        let msg = ToCell::Invoke {
            id: 7,
            name: "hello".into(),
            body: b"{}".to_vec(),
            timeout_ms: 0,
        };
        let frame = encode(&msg).expect("encode");
        let mut r = &frame[..];
        match read_blocking::<ToCell>(&mut r).expect("read") {
            Some(ToCell::Invoke { id, name, body, .. }) => {
                assert_eq!(
                    (id, name.as_str(), body.as_slice()),
                    (7, "hello", &b"{}"[..])
                )
            }
            other => panic!("got {other:?}"),
        }
        assert!(read_blocking::<ToCell>(&mut r).expect("end").is_none());
        // A length over the bound is refused before anything is allocated.
        let mut big = (MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 16]);
        assert!(read_blocking::<ToCell>(&mut &big[..]).is_err());
        // Every truncation fails cleanly; so does trailing garbage.
        for cut in 1..frame.len() {
            assert!(
                read_blocking::<ToCell>(&mut &frame[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut padded = frame[4..].to_vec();
        padded.push(0);
        assert!(decode::<ToCell>(&padded).is_err());
        // A result round-trips with its kind.
        let w: WireResult = JobResult::Refused(ErrorKind::NotFound, "no".into()).into();
        let back: JobResult = decode::<WireResult>(&encode(&w).expect("encode")[4..])
            .expect("decode")
            .into();
        assert!(matches!(back, JobResult::Refused(ErrorKind::NotFound, _)));
    }
}
