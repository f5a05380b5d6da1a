//! `poolrelay spool export` / `import`: a queue moved between spools (from
//! the embedded store to a replicated one and back) through a file, over
//! the [`Spool`] trait alone, so any backend exports and imports.
//!
//! The file (version 1; integers big endian):
//!
//! ```text
//! header  = "PRSPOOL\n" | version u16 | length u32 | JSON header | crc32 u32
//! record  = 'M' | queue id u64 | envelope length u32 | body length u64 | crc32 u32
//!           | envelope JSON (as the spool stores it) | body | crc32 u32
//! trailer = 'E' | messages u64 | body bytes u64 | crc32 u32
//! ```
//!
//! Each checksum covers the fields before it in its part (a record's first
//! one its fixed fields, so a damaged length is caught before it is used;
//! its second one the envelope and the body). Nothing may follow the
//! trailer. Lengths are bounded ([`MAX_ENVELOPE`], [`MAX_BODY`]) and a body
//! is read as its bytes arrive, so a record that claims 4 GB costs nothing
//! before it is refused. Both directions stream: one record in memory at a
//! time when exporting, at most [`IMPORT_WINDOW`] bytes of records (or the
//! largest message) waiting for the spool when importing.
//!
//! Import keeps queue ids ([`Spool::insert_with_id`]): an id already in the
//! spool with the same bytes is skipped, so importing a file twice, or
//! again after a crash, never queues a message twice. It writes each record
//! as it is read and stops at the first bad one: every record before it is
//! imported (and checked), nothing after it. Importing a good file again
//! completes the queue.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::{
    Durable, Envelope, Inserted, QueueId, RecipientState, Spool, SpoolError, format_id,
    is_storable_pool_name,
};

/// The first bytes of every export file.
pub const MAGIC: &[u8; 8] = b"PRSPOOL\n";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Longest header accepted (its JSON).
pub const MAX_HEADER: u32 = 64 * 1024;
/// Longest envelope accepted: a thousand recipients with 512-byte replies
/// take about 1 MiB.
pub const MAX_ENVELOPE: u32 = 16 * 1024 * 1024;
/// Largest body accepted: far above any `max_message_size` a relay takes,
/// still refusing a length that can only be damage or hostility.
pub const MAX_BODY: u64 = 1024 * 1024 * 1024;
/// Bytes of records an import hands the spool before awaiting the oldest:
/// enough to fill the writer's fsynced batches.
pub const IMPORT_WINDOW: usize = 16 * 1024 * 1024;
/// Records an import has in flight at most.
const IMPORT_WINDOW_RECORDS: usize = 512;
/// Messages read from the spool per step when exporting.
const EXPORT_PAGE: usize = 1024;

const RECORD: u8 = b'M';
const TRAILER: u8 = b'E';

/// What the header says about the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// When the export was written, Unix ms.
    pub created_ms: u64,
    /// The pool exported alone (`--pool`), none for the whole spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Pools the operator held, applied by the import.
    #[serde(default)]
    pub held: Vec<String>,
}

/// One message of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its queue id in the exporting spool, kept by the import.
    pub id: QueueId,
    /// Its envelope, attempt record applied.
    pub envelope: Envelope,
    /// Its bytes.
    pub body: Vec<u8>,
}

/// Why an export file was refused. Record numbers count from 1.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file does not start with [`MAGIC`].
    #[error("not a poolrelay spool export (it does not start with the export header)")]
    NotAnExport,
    /// A version this code does not read.
    #[error("export format version {0} is not supported (this poolrelay reads version {VERSION})")]
    Version(u16),
    /// The header is damaged.
    #[error("export header: {0}")]
    Header(String),
    /// A record is damaged or hostile.
    #[error("record {number}: {what}")]
    Record {
        /// Its number in the file.
        number: u64,
        /// What failed.
        what: String,
    },
    /// The file ends before its trailer.
    #[error("the file ends {0} without the trailer (truncated)")]
    Truncated(String),
    /// The trailer is damaged or disagrees with the records.
    #[error("export trailer: {0}")]
    Trailer(String),
    /// The input could not be read.
    #[error("cannot read the export: {0}")]
    Io(#[from] io::Error),
}

/// Why an export or import stopped.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The export file was refused.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// The export file could not be written.
    #[error("cannot write the export: {0}")]
    Write(io::Error),
    /// The spool failed as a whole.
    #[error("{0}")]
    Spool(#[from] SpoolError),
    /// A message of the spool being exported cannot be read: exporting
    /// without it would leave it behind when the old spool is deleted.
    #[error(
        "message {id} in pool {pool}: {what}; nothing can be exported until it is repaired or deleted"
    )]
    Source {
        /// Its queue id.
        id: String,
        /// Its pool.
        pool: String,
        /// What failed.
        what: String,
    },
    /// A record could not be stored.
    #[error("record {number} (queue id {id}): {what}")]
    Store {
        /// Its number in the file.
        number: u64,
        /// Its queue id.
        id: String,
        /// What failed.
        what: String,
    },
}

/// Counts of one pool in a [`Summary`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Messages.
    pub messages: u64,
    /// Recipients still pending over those messages.
    pub pending: u64,
    /// Body bytes.
    pub bytes: u64,
}

/// Messages, pending recipients and bytes per pool: what both commands
/// print, so the operator compares the two before deleting the old spool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Per pool, by name.
    pub pools: BTreeMap<String, PoolCounts>,
}

impl Summary {
    /// Counts one message.
    pub fn add(&mut self, envelope: &Envelope, body_len: u64) {
        let counts = self.pools.entry(envelope.pool.clone()).or_default();
        counts.messages += 1;
        counts.pending += envelope
            .recipients
            .iter()
            .filter(|r| r.state == RecipientState::Pending)
            .count() as u64;
        counts.bytes += body_len;
    }

    /// The sums over all pools.
    pub fn total(&self) -> PoolCounts {
        self.pools
            .values()
            .fold(PoolCounts::default(), |t, c| PoolCounts {
                messages: t.messages + c.messages,
                pending: t.pending + c.pending,
                bytes: t.bytes + c.bytes,
            })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<16} {:>10} {:>18} {:>14}",
            "POOL", "MESSAGES", "PENDING RECIPIENTS", "BYTES"
        )?;
        let total = self.total();
        for (pool, c) in self.pools.iter().chain([(&"total".to_string(), &total)]) {
            writeln!(
                f,
                "{pool:<16} {:>10} {:>18} {:>14}",
                c.messages, c.pending, c.bytes
            )?;
        }
        Ok(())
    }
}

/// Writes an export: [`Writer::new`] writes the header, [`Writer::record`]
/// one message, [`Writer::finish`] the trailer.
pub struct Writer<W: Write> {
    out: W,
    messages: u64,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    /// Starts an export with its header.
    pub fn new(mut out: W, header: &Header) -> io::Result<Writer<W>> {
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        let mut head = Vec::with_capacity(json.len() + 6);
        head.extend_from_slice(&VERSION.to_be_bytes());
        head.extend_from_slice(&(json.len() as u32).to_be_bytes());
        head.extend_from_slice(&json);
        out.write_all(MAGIC)?;
        out.write_all(&head)?;
        out.write_all(&crc32fast::hash(&head).to_be_bytes())?;
        Ok(Writer {
            out,
            messages: 0,
            bytes: 0,
        })
    }

    /// Writes one message.
    pub fn record(&mut self, id: QueueId, envelope: &Envelope, body: &[u8]) -> io::Result<()> {
        let json = serde_json::to_vec(envelope).map_err(io::Error::other)?;
        let fixed = record_fixed(id, json.len() as u32, body.len() as u64);
        self.out.write_all(&fixed)?;
        self.out.write_all(&crc32fast::hash(&fixed).to_be_bytes())?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&json);
        crc.update(body);
        self.out.write_all(&json)?;
        self.out.write_all(body)?;
        self.out.write_all(&crc.finalize().to_be_bytes())?;
        self.messages += 1;
        self.bytes += body.len() as u64;
        Ok(())
    }

    /// Writes the trailer and returns the output, flushed.
    pub fn finish(mut self) -> io::Result<W> {
        let fixed = trailer_fixed(self.messages, self.bytes);
        self.out.write_all(&fixed)?;
        self.out.write_all(&crc32fast::hash(&fixed).to_be_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn record_fixed(id: QueueId, envelope_len: u32, body_len: u64) -> [u8; 21] {
    let mut fixed = [0u8; 21];
    fixed[0] = RECORD;
    fixed[1..9].copy_from_slice(&id.to_be_bytes());
    fixed[9..13].copy_from_slice(&envelope_len.to_be_bytes());
    fixed[13..21].copy_from_slice(&body_len.to_be_bytes());
    fixed
}

fn trailer_fixed(messages: u64, bytes: u64) -> [u8; 17] {
    let mut fixed = [0u8; 17];
    fixed[0] = TRAILER;
    fixed[1..9].copy_from_slice(&messages.to_be_bytes());
    fixed[9..17].copy_from_slice(&bytes.to_be_bytes());
    fixed
}

/// Reads an export, checking every part: [`Reader::open`] reads the
/// header, [`Reader::next_record`] a record at a time, `None` after a valid trailer.
pub struct Reader<R: Read> {
    input: R,
    /// Records read so far.
    read: u64,
    bytes: u64,
    ended: bool,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end of input
/// before the first byte, an error for an end in the middle.
fn read_part(input: &mut impl Read, buf: &mut [u8], whole: bool) -> Result<bool, io::Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 && !whole => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn open(mut input: R) -> Result<(Reader<R>, Header), FormatError> {
        let mut magic = [0u8; 8];
        let eof = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => FormatError::NotAnExport,
            _ => FormatError::Io(e),
        };
        read_part(&mut input, &mut magic, true).map_err(eof)?;
        if &magic != MAGIC {
            return Err(FormatError::NotAnExport);
        }
        let truncated = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => FormatError::Truncated("inside the header".into()),
            _ => FormatError::Io(e),
        };
        let mut fixed = [0u8; 6];
        read_part(&mut input, &mut fixed, true).map_err(truncated)?;
        let version = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = be_u32(&fixed[2..]);
        if len > MAX_HEADER {
            // Checked before the version: a damaged length must not be read.
            return Err(FormatError::Header(format!(
                "claims {len} bytes, more than the {MAX_HEADER} allowed"
            )));
        }
        let mut json = vec![0u8; len as usize];
        read_part(&mut input, &mut json, true).map_err(truncated)?;
        let mut crc = [0u8; 4];
        read_part(&mut input, &mut crc, true).map_err(truncated)?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&fixed);
        hasher.update(&json);
        if hasher.finalize() != u32::from_be_bytes(crc) {
            return Err(FormatError::Header("checksum mismatch (damaged)".into()));
        }
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let header: Header = serde_json::from_slice(&json)
            .map_err(|e| FormatError::Header(format!("unreadable: {e}")))?;
        for pool in header.pool.iter().chain(&header.held) {
            if !is_storable_pool_name(pool) {
                return Err(FormatError::Header(format!(
                    "invalid pool name {pool:?} (letters, digits, _ or -, at most 64)"
                )));
            }
        }
        Ok((
            Reader {
                input,
                read: 0,
                bytes: 0,
                ended: false,
            },
            header,
        ))
    }

    /// Records read so far (all checked).
    pub fn records_read(&self) -> u64 {
        self.read
    }

    /// The next record, checked; `None` once the trailer was read and found
    /// to agree with the records.
    pub fn next_record(&mut self) -> Result<Option<Record>, FormatError> {
        if self.ended {
            return Ok(None);
        }
        let number = self.read + 1;
        let bad = |what: String| FormatError::Record { number, what };
        let truncated = |e: io::Error, part: &str| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                FormatError::Truncated(format!("inside record {number} ({part})"))
            }
            _ => FormatError::Io(e),
        };
        let mut kind = [0u8; 1];
        if !read_part(&mut self.input, &mut kind, false).map_err(|e| truncated(e, "kind"))? {
            return Err(FormatError::Truncated(format!(
                "after record {}",
                self.read
            )));
        }
        match kind[0] {
            RECORD => {}
            TRAILER => return self.trailer().map(|()| None),
            other => return Err(bad(format!("unknown record kind 0x{other:02x} (damaged)"))),
        }
        let mut fixed = [0u8; 21];
        fixed[0] = RECORD;
        read_part(&mut self.input, &mut fixed[1..], true).map_err(|e| truncated(e, "lengths"))?;
        let mut crc = [0u8; 4];
        read_part(&mut self.input, &mut crc, true).map_err(|e| truncated(e, "lengths"))?;
        if crc32fast::hash(&fixed) != u32::from_be_bytes(crc) {
            return Err(bad(
                "checksum of the id and lengths mismatch (damaged)".into()
            ));
        }
        let id = be_u64(&fixed[1..9]);
        let envelope_len = be_u32(&fixed[9..13]);
        let body_len = be_u64(&fixed[13..21]);
        let bad = |what: String| FormatError::Record {
            number,
            what: format!("queue id {}: {what}", format_id(id)),
        };
        if envelope_len > MAX_ENVELOPE {
            return Err(bad(format!(
                "envelope claims {envelope_len} bytes, more than the {MAX_ENVELOPE} allowed"
            )));
        }
        if body_len > MAX_BODY {
            return Err(bad(format!(
                "message claims {body_len} bytes, more than the {MAX_BODY} allowed"
            )));
        }
        let mut json = Vec::new();
        read_growing(&mut self.input, &mut json, u64::from(envelope_len))
            .map_err(|e| truncated(e, "envelope"))?;
        let mut body = Vec::new();
        read_growing(&mut self.input, &mut body, body_len).map_err(|e| truncated(e, "message"))?;
        read_part(&mut self.input, &mut crc, true).map_err(|e| truncated(e, "checksum"))?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&json);
        hasher.update(&body);
        if hasher.finalize() != u32::from_be_bytes(crc) {
            return Err(bad(
                "checksum of the envelope and message mismatch (damaged)".into(),
            ));
        }
        let envelope: Envelope =
            serde_json::from_slice(&json).map_err(|e| bad(format!("unreadable envelope: {e}")))?;
        if !is_storable_pool_name(&envelope.pool) {
            return Err(bad(format!(
                "invalid pool name {:?} (letters, digits, _ or -, at most 64)",
                envelope.pool
            )));
        }
        self.read = number;
        self.bytes += body_len;
        Ok(Some(Record { id, envelope, body }))
    }

    fn trailer(&mut self) -> Result<(), FormatError> {
        let mut fixed = [0u8; 17];
        fixed[0] = TRAILER;
        let mut crc = [0u8; 4];
        let truncated = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => FormatError::Truncated("inside the trailer".into()),
            _ => FormatError::Io(e),
        };
        read_part(&mut self.input, &mut fixed[1..], true).map_err(truncated)?;
        read_part(&mut self.input, &mut crc, true).map_err(truncated)?;
        if crc32fast::hash(&fixed) != u32::from_be_bytes(crc) {
            return Err(FormatError::Trailer("checksum mismatch (damaged)".into()));
        }
        let (messages, bytes) = (be_u64(&fixed[1..9]), be_u64(&fixed[9..17]));
        if (messages, bytes) != (self.read, self.bytes) {
            return Err(FormatError::Trailer(format!(
                "says {messages} messages of {bytes} bytes, the file holds {} of {}",
                self.read, self.bytes
            )));
        }
        let mut extra = [0u8; 1];
        if read_part(&mut self.input, &mut extra, false)? {
            return Err(FormatError::Trailer("bytes follow the trailer".into()));
        }
        self.ended = true;
        Ok(())
    }
}

/// Reads `len` bytes into `buf`, growing it as bytes arrive: a length
/// that lies costs only what the input really holds.
fn read_growing(input: &mut impl Read, buf: &mut Vec<u8>, len: u64) -> io::Result<()> {
    buf.reserve(len.min(1 << 20) as usize);
    let got = input.take(len).read_to_end(buf)?;
    if (got as u64) < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes every message of `spool` (or of `pool` alone) to `out`, pool by
/// pool, oldest first, and the pools recorded as held. Reads only.
pub fn export<W: Write>(
    spool: &dyn Spool,
    pool: Option<&str>,
    out: W,
) -> Result<(W, Summary), TransferError> {
    let mut pools = match pool {
        Some(p) => vec![p.to_string()],
        None => spool.pools(),
    };
    pools.sort();
    let held = spool
        .held_pools()?
        .into_iter()
        .filter(|h| pool.is_none_or(|p| p == h))
        .collect();
    let header = Header {
        created_ms: crate::now_ms(),
        pool: pool.map(str::to_string),
        held,
    };
    let mut writer = Writer::new(out, &header).map_err(TransferError::Write)?;
    let mut summary = Summary::default();
    for pool in &pools {
        let mut after = None;
        loop {
            let page = spool.list(pool, after, EXPORT_PAGE)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            for (id, envelope) in page {
                let source = |what: String| TransferError::Source {
                    id: format_id(id),
                    pool: pool.clone(),
                    what,
                };
                let envelope = envelope.map_err(|e| source(e.to_string()))?;
                let body = spool
                    .body(id)
                    .map_err(|e| source(e.to_string()))?
                    .ok_or_else(|| source("its envelope has no message bytes".into()))?;
                writer
                    .record(id, &envelope, &body)
                    .map_err(TransferError::Write)?;
                summary.add(&envelope, body.len() as u64);
            }
        }
    }
    let out = writer.finish().map_err(TransferError::Write)?;
    Ok((out, summary))
}

/// What an import did, also when it stopped early.
#[derive(Debug, Default)]
pub struct Import {
    /// The export's header, once read.
    pub header: Option<Header>,
    /// The records read and checked (all of them once `error` is none).
    pub summary: Summary,
    /// Messages stored.
    pub stored: u64,
    /// Messages already in the spool with the same id and bytes, skipped.
    pub already_there: u64,
    /// Why it stopped before the end; records before the failed one were
    /// imported.
    pub error: Option<TransferError>,
}

/// Reads the export in `input` and, when `write`, stores each record in
/// `spool` under its queue id (see the module's doc), then records the
/// held pools. Without `write` it only checks the whole file. Reading the
/// input blocks: run it on a current-thread runtime.
pub async fn import<R: Read>(spool: &dyn Spool, input: R, write: bool) -> Import {
    let mut import = Import::default();
    let (mut reader, header) = match Reader::open(input) {
        Ok(opened) => opened,
        Err(e) => {
            import.error = Some(e.into());
            return import;
        }
    };
    import.header = Some(header.clone());
    let mut in_flight: VecDeque<(u64, QueueId, usize, Durable<Inserted>)> = VecDeque::new();
    let mut in_flight_bytes = 0usize;
    loop {
        let record = match reader.next_record() {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(e) => {
                import.error = Some(e.into());
                break;
            }
        };
        let number = reader.records_read();
        import
            .summary
            .add(&record.envelope, record.body.len() as u64);
        if !write {
            continue;
        }
        let size = record.body.len();
        let pending = spool.insert_with_id(record.id, record.envelope, record.body);
        in_flight.push_back((number, record.id, size, pending));
        in_flight_bytes += size;
        while in_flight_bytes > IMPORT_WINDOW || in_flight.len() >= IMPORT_WINDOW_RECORDS {
            let Some(front) = in_flight.pop_front() else {
                break;
            };
            in_flight_bytes -= front.2;
            settle(&mut import, front).await;
        }
        if import.error.is_some() {
            break;
        }
    }
    // Everything handed to the spool is counted, also after an error.
    while let Some(front) = in_flight.pop_front() {
        settle(&mut import, front).await;
    }
    if write && import.error.is_none() {
        for pool in &header.held {
            if let Err(e) = spool.set_held(pool, true).await {
                import.error = Some(TransferError::Spool(e));
                break;
            }
        }
    }
    import
}

/// Awaits one insert and counts it; the first failure is kept.
async fn settle(
    import: &mut Import,
    (number, id, _, pending): (u64, QueueId, usize, Durable<Inserted>),
) {
    let failed = |what: String| TransferError::Store {
        number,
        id: format_id(id),
        what,
    };
    let error = match pending.await {
        Ok(Inserted::Stored) => {
            import.stored += 1;
            None
        }
        Ok(Inserted::AlreadyThere) => {
            import.already_there += 1;
            None
        }
        Ok(Inserted::Conflict) => Some(failed(
            "the spool already holds another message under this queue id".into(),
        )),
        Err(e) => Some(failed(e.to_string())),
    };
    if let (Some(e), None) = (error, &import.error) {
        import.error = Some(e);
    }
}

#[cfg(test)]
mod tests;
