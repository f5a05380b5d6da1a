//! DATA framing, strict: the message ends only at CRLF.CRLF, and a bare CR
//! or bare LF anywhere in the content is an error (SMTP smuggling defence).
//!
//! The decoder is sans-IO: it is fed whatever bytes arrived after the 354,
//! split anywhere, and says how many of them belonged to the message. A
//! refused message is still read to its real end so that the bytes after it
//! are taken as commands, never as the remainder of the content: a peer
//! that reads `<LF>.<LF>` as the end would otherwise see one message where
//! we see two (or the reverse).

/// Why a message that reached its end is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// A CR not followed by LF, or an LF not preceded by CR, was seen.
    BareLineEnding,
    /// The content exceeded the size limit.
    TooLarge,
}

impl DataError {
    /// The reply that refuses the transaction, CRLF included.
    pub fn reply(self) -> &'static [u8] {
        match self {
            DataError::BareLineEnding => {
                b"554 5.6.0 bare CR or LF in message content refused (SMTP smuggling)\r\n"
            }
            DataError::TooLarge => b"552 5.3.4 message size exceeds fixed maximum\r\n",
        }
    }
}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataError::BareLineEnding => f.write_str("bare CR or LF in message content"),
            DataError::TooLarge => f.write_str("message size exceeds the limit"),
        }
    }
}

impl std::error::Error for DataError {}

/// Whether the end of the message was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    /// All input was consumed; the message continues.
    More,
    /// CRLF.CRLF was consumed: the message is complete, accepted or refused.
    Done(Result<(), DataError>),
}

/// Where the decoder stands relative to line boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Just after CRLF (or at the very start): a dot here is special.
    LineStart,
    /// Inside a line.
    Mid,
    /// A CR was seen and not yet written: LF completes the line ending.
    Cr,
    /// A dot at the start of a line was seen and dropped.
    Dot,
    /// CRLF "." CR seen: LF ends the message.
    DotCr,
    /// The end was reached; nothing more is consumed.
    Finished,
}

/// Decodes message content after the 354: unstuffs dots, finds the end,
/// refuses bare CR/LF and oversized content.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    state: State,
    max_size: u64,
    size: u64,
    bare: bool,
    too_large: bool,
}

impl DataDecoder {
    /// A decoder for one message of at most `max_size` content bytes
    /// (after unstuffing, final dot excluded).
    pub fn new(max_size: u64) -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
            max_size,
            size: 0,
            bare: false,
            too_large: false,
        }
    }

    /// Content bytes seen so far (counted even after the limit was passed).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True once the message is known to be refused; its content is no
    /// longer written, only read through to the end.
    pub fn failed(&self) -> bool {
        self.bare || self.too_large
    }

    /// Consumes message bytes from `input`, appending unstuffed content to
    /// `out` (nothing more once the message is known to be refused).
    /// Returns how many bytes were consumed: all of `input` with
    /// [`DataStatus::More`], or up to and including the final LF with
    /// [`DataStatus::Done`] (the rest belongs to the next command).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Finished => return (i, self.status()),
                State::Mid => {
                    // Fast path: copy the run of ordinary bytes at once.
                    let rest = &input[i..];
                    let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                    self.emit(&rest[..run], out);
                    i += run;
                    if let Some(&b) = rest.get(run) {
                        i += 1;
                        if b == b'\r' {
                            self.state = State::Cr;
                        } else {
                            // LF without CR before it.
                            self.bare = true;
                        }
                    }
                }
                State::LineStart => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'.' => self.state = State::Dot,
                        b'\r' => self.state = State::Cr,
                        b'\n' => {
                            self.bare = true;
                            self.state = State::Mid;
                        }
                        _ => {
                            self.emit(&[b], out);
                            self.state = State::Mid;
                        }
                    }
                }
                State::Cr => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\n' => {
                            self.emit(b"\r\n", out);
                            self.state = State::LineStart;
                        }
                        b'\r' => {
                            // The first CR was bare; this one may still be
                            // followed by LF.
                            self.bare = true;
                        }
                        _ => {
                            self.bare = true;
                            self.emit(&[b'\r', b], out);
                            self.state = State::Mid;
                        }
                    }
                }
                State::Dot => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\r' => self.state = State::DotCr,
                        b'\n' => {
                            // CRLF "." LF: never an end.
                            self.bare = true;
                            self.state = State::Mid;
                        }
                        _ => {
                            // The leading dot is removed (RFC 5321 §4.5.2),
                            // whatever follows it.
                            self.emit(&[b], out);
                            self.state = State::Mid;
                        }
                    }
                }
                State::DotCr => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\n' => {
                            self.state = State::Finished;
                            return (i, self.status());
                        }
                        b'\r' => {
                            // CRLF "." CR CR: the first CR was bare.
                            self.bare = true;
                            self.state = State::Cr;
                        }
                        _ => {
                            self.bare = true;
                            self.state = State::Mid;
                        }
                    }
                }
            }
        }
        (i, self.status())
    }

    fn status(&self) -> DataStatus {
        if self.state != State::Finished {
            DataStatus::More
        } else if self.bare {
            DataStatus::Done(Err(DataError::BareLineEnding))
        } else if self.too_large {
            DataStatus::Done(Err(DataError::TooLarge))
        } else {
            DataStatus::Done(Ok(()))
        }
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.size > self.max_size {
            self.too_large = true;
        }
        // Keep no content of a refused message: it is never queued, and
        // an oversized one must not grow memory without bound.
        if !self.failed() {
            out.extend_from_slice(bytes);
        }
    }
}

/// Encodes message content for the wire after a 354: dot-stuffs lines
/// that begin with '.', turns any bare CR or LF into CRLF (so a lax
/// upstream can never see a smuggled end), and appends the final
/// `CRLF . CRLF` in [`DataEncoder::finish`]. Input may be split anywhere.
#[derive(Debug, Clone)]
pub struct DataEncoder {
    line_start: bool,
    pending_cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        DataEncoder::new()
    }
}

impl DataEncoder {
    /// An encoder at the start of a message.
    pub fn new() -> DataEncoder {
        DataEncoder {
            line_start: true,
            pending_cr: false,
        }
    }

    /// Appends the encoded form of `input` to `out` (at most twice its size).
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            if self.pending_cr {
                // A CR was written; whatever follows, the line ends here.
                self.pending_cr = false;
                out.push(b'\n');
                self.line_start = true;
                if input[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            if self.line_start {
                self.line_start = false;
                if input[i] == b'.' {
                    out.push(b'.');
                }
            }
            let rest = &input[i..];
            let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            out.extend_from_slice(&rest[..run]);
            i += run;
            if let Some(&b) = rest.get(run) {
                i += 1;
                out.push(b'\r');
                if b == b'\r' {
                    self.pending_cr = true;
                } else {
                    out.push(b'\n');
                    self.line_start = true;
                }
            }
        }
    }

    /// Ends the message: completes the last line and appends `.` CRLF.
    /// The encoder is then ready for another message.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr {
            out.push(b'\n');
        } else if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        *self = DataEncoder::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in the given chunk sizes (cycled); returns the bytes
    /// consumed, the content and the status.
    fn run_chunks(input: &[u8], max: u64, chunks: &[usize]) -> (usize, Vec<u8>, DataStatus) {
        let mut d = DataDecoder::new(max);
        let mut out = Vec::new();
        let mut pos = 0;
        let mut k = 0;
        loop {
            let n = chunks[k % chunks.len()].max(1);
            k += 1;
            let end = (pos + n).min(input.len());
            let (used, st) = d.feed(&input[pos..end], &mut out);
            pos += used;
            if let DataStatus::Done(_) = st {
                return (pos, out, st);
            }
            assert_eq!(pos, end, "More must consume everything");
            if pos == input.len() {
                return (pos, out, st);
            }
        }
    }

    fn whole(input: &[u8]) -> (usize, Vec<u8>, DataStatus) {
        run_chunks(input, u64::MAX, &[usize::MAX])
    }

    #[test]
    fn empty_message_ends_on_first_dot() {
        let (used, out, st) = whole(b".\r\nQUIT\r\n");
        assert_eq!(used, 3);
        assert!(out.is_empty());
        assert_eq!(st, DataStatus::Done(Ok(())));
    }

    #[test]
    fn plain_message_and_unstuffing() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.x\r\n...\r\nend\r\n.\r\nNEXT";
        let (used, out, st) = whole(input);
        assert_eq!(st, DataStatus::Done(Ok(())));
        assert_eq!(&input[used..], b"NEXT");
        assert_eq!(out, b"Subject: x\r\n\r\n.leading dot\r\nx\r\n..\r\nend\r\n");
    }

    #[test]
    fn smuggling_endings_never_end_the_message() {
        for fake in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r",
            b"\r.\r\n",
            b"\r\n.\r\r\n",
        ] {
            let mut input = b"a".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(b"MAIL FROM:<x@y>\r\nsmuggled\r\n.\r\nRSET\r\n");
            let (used, out, st) = whole(&input);
            assert_eq!(
                st,
                DataStatus::Done(Err(DataError::BareLineEnding)),
                "{fake:?}"
            );
            assert_eq!(&input[used..], b"RSET\r\n", "{fake:?}");
            assert!(
                !out.windows(8).any(|w| w == b"smuggled"),
                "content after the error is not kept"
            );
        }
    }

    #[test]
    fn bare_lf_at_line_start_and_bare_cr_mid_line() {
        for input in [&b"\n.\r\n.\r\n"[..], b"x\ry\r\n.\r\n", b"x\r\r\n.\r\n"] {
            let (used, _, st) = whole(input);
            assert_eq!(used, input.len());
            assert_eq!(st, DataStatus::Done(Err(DataError::BareLineEnding)));
        }
    }

    #[test]
    fn size_limit_reads_to_the_end() {
        let input = b"0123456789\r\n0123456789\r\n.\r\nNOOP\r\n";
        let (used, out, st) = run_chunks(input, 12, &[1]);
        assert_eq!(st, DataStatus::Done(Err(DataError::TooLarge)));
        assert_eq!(&input[used..], b"NOOP\r\n");
        assert!(out.len() <= 12);
        let (_, out, st) = run_chunks(input, 24, &[1]);
        assert_eq!(st, DataStatus::Done(Ok(())));
        assert_eq!(out.len(), 24);
    }

    /// A deliberately simple reference: split the stream on CRLF lines.
    fn oracle(input: &[u8], max: u64) -> (usize, Vec<u8>, DataStatus) {
        let mut bare = false;
        let mut out = Vec::new();
        let mut line_start = 0;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if b == b'\n' && (i == 0 || input[i - 1] != b'\r') {
                bare = true;
            }
            if b == b'\r' && input.get(i + 1).is_some_and(|&n| n != b'\n') {
                bare = true;
            }
            if b == b'\n' && i > 0 && input[i - 1] == b'\r' {
                let line = &input[line_start..=i];
                if line == b".\r\n" {
                    let st = if bare {
                        Err(DataError::BareLineEnding)
                    } else if out.len() as u64 > max {
                        Err(DataError::TooLarge)
                    } else {
                        Ok(())
                    };
                    if st.is_err() {
                        out.clear();
                    }
                    return (i + 1, out, DataStatus::Done(st));
                }
                let line = line.strip_prefix(b".").unwrap_or(line);
                out.extend_from_slice(line);
                line_start = i + 1;
            }
            i += 1;
        }
        (input.len(), Vec::new(), DataStatus::More)
    }

    /// xorshift64*: deterministic randomness without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_inputs_match_the_oracle_at_any_split() {
        let alphabet = [b'\r', b'\n', b'.', b'a', b' '];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = rng.below(24);
            let mut input: Vec<u8> = (0..len).map(|_| alphabet[rng.below(5)]).collect();
            if rng.below(2) == 0 {
                input.extend_from_slice(b"\r\n.\r\n");
            }
            let max = rng.below(12) as u64;
            let (eu, eo, es) = oracle(&input, max);
            // Whole, byte by byte, and random chunk sizes.
            let chunks: Vec<usize> = (0..8).map(|_| 1 + rng.below(6)).collect();
            for split in [&[usize::MAX][..], &[1], &chunks] {
                let (u, o, s) = run_chunks(&input, max, split);
                assert_eq!(s, es, "{input:?} max {max} split {split:?}");
                if let DataStatus::Done(r) = s {
                    assert_eq!(u, eu, "{input:?}");
                    if r.is_ok() {
                        assert_eq!(o, eo, "{input:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_two_way_split() {
        let input = b"a\r\n..b\r\n\r\n.c\r\n.\r\nREST";
        let (eu, eo, es) = whole(input);
        for cut in 0..=input.len() {
            let mut d = DataDecoder::new(u64::MAX);
            let mut out = Vec::new();
            let (u1, s1) = d.feed(&input[..cut], &mut out);
            let (used, st) = if let DataStatus::Done(_) = s1 {
                (u1, s1)
            } else {
                let (u2, s2) = d.feed(&input[cut..], &mut out);
                (u1 + u2, s2)
            };
            assert_eq!((used, &out, st), (eu, &eo, es), "cut {cut}");
        }
    }

    fn encode(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut e = DataEncoder::new();
        let mut out = Vec::new();
        for part in input.chunks(chunk.max(1)) {
            e.encode(part, &mut out);
        }
        e.finish(&mut out);
        out
    }

    #[test]
    fn encoder_stuffs_and_terminates() {
        assert_eq!(encode(b"", 9), b".\r\n");
        assert_eq!(encode(b"a", 9), b"a\r\n.\r\n");
        assert_eq!(
            encode(b".hello\r\n..x\r\nline\r\n.\r\nend", 9),
            b"..hello\r\n...x\r\nline\r\n..\r\nend\r\n.\r\n"
        );
        // Bare line endings become CRLF, so a smuggled end cannot pass.
        assert_eq!(encode(b"a\n.\nb\r.\r", 9), b"a\r\n..\r\nb\r\n..\r\n.\r\n");
    }

    #[test]
    fn encoder_then_decoder_round_trips_at_any_split() {
        let alphabet = [b'\r', b'\n', b'.', b'a'];
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..5_000 {
            let len = rng.below(20);
            let input: Vec<u8> = (0..len).map(|_| alphabet[rng.below(4)]).collect();
            let wire = encode(&input, 1 + rng.below(5));
            assert_eq!(wire, encode(&input, usize::MAX), "{input:?}");
            let (used, content, st) = run_chunks(&wire, u64::MAX, &[1 + rng.below(5)]);
            assert_eq!(st, DataStatus::Done(Ok(())), "{input:?} -> {wire:?}");
            assert_eq!(used, wire.len());
            // The content is the input with every line ending made CRLF.
            let mut expect = Vec::new();
            let mut k = 0;
            while k < input.len() {
                match input[k] {
                    b'\r' if input.get(k + 1) == Some(&b'\n') => {
                        expect.extend_from_slice(b"\r\n");
                        k += 1;
                    }
                    b'\r' | b'\n' => expect.extend_from_slice(b"\r\n"),
                    b => expect.push(b),
                }
                k += 1;
            }
            if !expect.is_empty() && !expect.ends_with(b"\r\n") {
                expect.extend_from_slice(b"\r\n");
            }
            assert_eq!(content, expect, "{input:?}");
        }
    }
}
