//! SMTP smuggling: an end of data other than CRLF.CRLF never ends a
//! message, and a message holding such a sequence is refused whole, so no
//! smuggled second message reaches the upstream.

use std::time::Duration;

use poolrelay_tests::{Relay, Sink, message, unique_id};

/// The fake endings (name, bytes).
const ENDINGS: &[(&str, &[u8])] = &[
    ("<LF>.<LF>", b"\n.\n"),
    ("<LF>.<CR><LF>", b"\n.\r\n"),
    ("<CR><LF>.<LF>", b"\r\n.\n"),
    ("<CR>.<CR>", b"\r.\r"),
    ("<CR>.<CR><LF>", b"\r.\r\n"),
];

/// Sends one carrier message whose data holds `ending` followed by a whole
/// smuggled transaction, then a proper CRLF.CRLF. Returns a description of
/// what went wrong, or None when the relay refused it with a 5xx.
fn try_smuggle(relay: &Relay, name: &str, ending: &[u8]) -> Option<String> {
    let mut c = relay.client();
    let from = "owner-carrier@lists.test";
    for (cmd, want) in [
        ("EHLO client.test".to_string(), 250),
        (format!("MAIL FROM:<{from}>"), 250),
        ("RCPT TO:<member@example.test>".to_string(), 250),
        ("DATA".to_string(), 354),
    ] {
        let r = c.cmd(&cmd);
        if r.code != want {
            return Some(format!("{name}: {cmd} got {r} (expected {want})"));
        }
    }
    let carrier_id = unique_id("carrier");
    let smuggled_id = unique_id("smuggled");
    let mut data = format!(
        "From: <{from}>\r\nTo: <member@example.test>\r\nSubject: carrier {name}\r\n\
         Message-ID: <{carrier_id}>\r\n\r\nfirst part"
    )
    .into_bytes();
    data.extend_from_slice(ending);
    data.extend_from_slice(
        format!(
            "MAIL FROM:<smuggler@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n\
             From: <smuggler@evil.test>\r\nSubject: smuggled {name}\r\nMessage-ID: <{smuggled_id}>\r\n\r\n\
             smuggled body\r\n.\r\n"
        )
        .as_bytes(),
    );
    // The relay may refuse as soon as it sees the bad sequence; a failed
    // write is fine as long as its 5xx can be read.
    let write = c.write_bytes(&data);
    match c.read_reply() {
        Ok(r) if (500..600).contains(&r.code) => None,
        Ok(r) => Some(format!(
            "{name}: the final dot got {r}, expected a 5xx (write: {write:?})"
        )),
        Err(e) => Some(format!(
            "{name}: no reply to the final dot: {e} (write: {write:?})"
        )),
    }
}

#[test]
fn smuggled_end_of_data_sequences_are_refused_and_nothing_is_delivered() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));

    let failures: Vec<String> = ENDINGS
        .iter()
        .filter_map(|(name, ending)| try_smuggle(&relay, name, ending))
        .collect();

    // A proper message afterwards gives the wait a condition: once it is at
    // the sink, anything queued earlier had its chance to arrive too.
    let good = unique_id("after-smuggling");
    let from = "owner-good@lists.test";
    relay.send(
        from,
        &["member@example.test"],
        &message(&good, from, "member@example.test", "good", "fine"),
    );
    sink.wait_for_message_id(&good, Duration::from_secs(30));
    let ids = sink.message_ids();

    assert!(
        failures.is_empty() && ids == vec![good.clone()],
        "smuggling endings not refused:\n{}\nthe sink holds {ids:?} (expected only <{good}>)\n{}",
        failures.join("\n"),
        relay.logs()
    );
}
