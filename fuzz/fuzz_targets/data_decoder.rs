//! DATA framing on arbitrary bytes: the same result however the input is
//! split, the end is exactly the first CRLF.CRLF (counting the start of the
//! data as a line start) and nothing else, accepted content has only CRLF
//! line endings and stays within the limit, and the encoder sends it back
//! unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolrelay_smtp::{DataDecoder, DataEncoder, DataError, DataStatus};

/// Feeds `input` in chunks of the given sizes (cycled, 0 = 1 byte) like the
/// session does: stops at Done, and More must have used every byte. The
/// content of a message known to be refused is not compared: the decoder
/// stops keeping it at a point that depends on the split, and it is dropped.
fn decode(input: &[u8], max: u64, chunks: &[usize]) -> (usize, Vec<u8>, DataStatus) {
    let mut decoder = DataDecoder::new(max);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut k = 0;
    loop {
        let end = (pos + chunks[k % chunks.len()].max(1)).min(input.len());
        k += 1;
        let (used, status) = decoder.feed(&input[pos..end], &mut out);
        assert!(used <= end - pos, "used more than it was given");
        pos += used;
        assert!(out.len() as u64 <= max, "kept more content than the limit");
        if let DataStatus::Done(_) = status {
            assert!(
                decoder.feed(b"MORE\r\n", &mut Vec::new()).0 == 0,
                "fed after the end"
            );
            return (pos, if decoder.failed() { Vec::new() } else { out }, status);
        }
        assert_eq!(pos, end, "More must consume the whole chunk");
        if pos == input.len() {
            return (pos, if decoder.failed() { Vec::new() } else { out }, status);
        }
    }
}

/// FNV-1a: chunk sizes and limits that depend on the input, so the corpus
/// stays plain message text.
fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fuzz_target!(|input: &[u8]| {
    // Where the message must end: the first CRLF "." CRLF, the data
    // starting at a line start.
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(input);
    let end = framed
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|i| i + 5 - 2);
    // The content the wire says, unstuffed, line by line; and whether a
    // bare CR or LF occurs before the end.
    let body = &input[..end.map_or(input.len(), |e| e - 3)];
    let bare = body.iter().enumerate().any(|(i, &b)| {
        (b == b'\r' && body.get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && (i == 0 || body[i - 1] != b'\r'))
    });
    let mut expect = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        expect.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }

    let h = hash(input);
    let chunks: Vec<usize> = (0..6).map(|i| ((h >> (i * 8)) & 0x1f) as usize).collect();
    for max in [u64::MAX, (h % (input.len() as u64 + 1))] {
        let whole = decode(input, max, &[usize::MAX]);
        assert_eq!(whole, decode(input, max, &[1]), "byte by byte differs");
        assert_eq!(
            whole,
            decode(input, max, &chunks),
            "chunks {chunks:?} differ"
        );
        let (used, out, status) = whole;
        match (end, status) {
            (None, DataStatus::More) => assert_eq!(used, input.len()),
            (Some(end), DataStatus::Done(result)) => {
                assert_eq!(used, end, "the message must end at the first CRLF.CRLF");
                let expected = if bare {
                    Err(DataError::BareLineEnding)
                } else if expect.len() as u64 > max {
                    Err(DataError::TooLarge)
                } else {
                    Ok(())
                };
                assert_eq!(result, expected);
                if result.is_ok() {
                    assert_eq!(out, expect, "content is the unstuffed lines");
                    check_content(&out);
                    round_trip(&out);
                }
            }
            (end, status) => panic!("end at {end:?} but the decoder said {status:?}"),
        }
    }
});

/// Accepted content: only CRLF line endings, and it ends with one.
fn check_content(out: &[u8]) {
    for (i, &b) in out.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in content"),
            b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "bare LF in content"),
            _ => {}
        }
    }
    assert!(out.is_empty() || out.ends_with(b"\r\n"));
}

/// What we accepted, sent on by the encoder, is read back unchanged and
/// ends exactly where the encoder put the end.
fn round_trip(content: &[u8]) {
    let mut wire = Vec::new();
    let mut encoder = DataEncoder::new();
    encoder.encode(content, &mut wire);
    encoder.finish(&mut wire);
    let (used, back, status) = decode(&wire, u64::MAX, &[usize::MAX]);
    assert_eq!(status, DataStatus::Done(Ok(())));
    assert_eq!(used, wire.len());
    assert_eq!(back, content);
}
