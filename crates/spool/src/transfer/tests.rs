use super::*;
use crate::{MemorySpool, Recipient, Reply};

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// A spool with three messages over two pools: one deferred after two
/// attempts, one with a recipient delivered, one with MT-PRIORITY and DSN
/// parameters; pool B held.
fn source() -> (MemorySpool, Vec<QueueId>) {
    let spool = MemorySpool::new();
    let ids = block_on(async {
        let mut deferred = Envelope::new(
            "A",
            "owner-a@lists.test",
            vec![Recipient::pending("x@example.test")],
            5,
            "main",
            "127.0.0.1:1",
        );
        deferred.attempts = 2;
        deferred.next_attempt_ms = 4_000_000_000_000;
        deferred.recipients[0].last_reply = Some(Reply::local(451, "4.3.0", "later"));
        let mut partly = Envelope::new(
            "A",
            "",
            vec![
                Recipient::pending("y@example.test"),
                Recipient::pending("z@example.test"),
            ],
            6,
            "main",
            "127.0.0.1:2",
        );
        partly.recipients[0].state = RecipientState::Delivered;
        let mut urgent = Envelope::new(
            "B",
            "owner-b@lists.test",
            vec![Recipient::pending("w@example.test")],
            3,
            "main",
            "127.0.0.1:3",
        );
        urgent.mt_priority = Some(4);
        urgent.envid = Some("E1".into());
        urgent.recipients[0].notify = 3;
        urgent.delay_warned = true;
        let a = spool.append(deferred, b"hello".to_vec()).await.unwrap();
        let b = spool.append(partly, b"world!".to_vec()).await.unwrap();
        let c = spool.append(urgent, b"sos".to_vec()).await.unwrap();
        spool.set_held("B", true).await.unwrap();
        vec![a, b, c]
    });
    (spool, ids)
}

fn exported(spool: &MemorySpool, pool: Option<&str>) -> (Vec<u8>, Summary) {
    export(spool, pool, Vec::new()).unwrap()
}

/// Every message of `spool`: id, envelope, body.
fn contents(spool: &MemorySpool) -> Vec<(QueueId, Envelope, Vec<u8>)> {
    let mut all = Vec::new();
    spool
        .recover(&mut |id, env| {
            let body = spool.body(id).unwrap().unwrap().to_vec();
            all.push((id, env, body));
        })
        .unwrap();
    all.sort_by_key(|(id, _, _)| *id);
    all
}

#[test]
fn an_import_keeps_ids_envelopes_bytes_and_holds() {
    let (spool, ids) = source();
    let (file, summary) = exported(&spool, None);
    let a = summary.pools["A"];
    assert_eq!((a.messages, a.pending, a.bytes), (2, 2, 11));
    assert_eq!(summary.total().messages, 3);
    let target = MemorySpool::new();
    let done = block_on(import(&target, file.as_slice(), true));
    assert!(done.error.is_none(), "{:?}", done.error);
    assert_eq!((done.stored, done.already_there), (3, 0));
    assert_eq!(done.summary, summary);
    assert_eq!(contents(&target), contents(&spool));
    assert_eq!(
        contents(&target).iter().map(|c| c.0).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(target.held_pools().unwrap(), vec!["B".to_string()]);
    // New mail is queued above the imported ids.
    let next =
        block_on(target.append(spool.envelope(ids[0], "A").unwrap().unwrap(), b"n".to_vec()))
            .unwrap();
    assert!(next > ids[2]);
}

#[test]
fn exporting_changes_nothing_in_the_source() {
    let (spool, _) = source();
    let before = contents(&spool);
    exported(&spool, None);
    assert_eq!(contents(&spool), before);
}

#[test]
fn importing_twice_queues_each_message_once() {
    let (spool, _) = source();
    let (file, _) = exported(&spool, None);
    let target = MemorySpool::new();
    block_on(import(&target, file.as_slice(), true));
    let again = block_on(import(&target, file.as_slice(), true));
    assert!(again.error.is_none(), "{:?}", again.error);
    assert_eq!((again.stored, again.already_there), (0, 3));
    assert_eq!(contents(&target), contents(&spool));
}

#[test]
fn a_pool_exports_alone_with_its_hold() {
    let (spool, ids) = source();
    let (file, summary) = exported(&spool, Some("B"));
    assert_eq!(summary.pools.keys().collect::<Vec<_>>(), ["B"]);
    let target = MemorySpool::new();
    let done = block_on(import(&target, file.as_slice(), true));
    assert_eq!(done.header.unwrap().pool.as_deref(), Some("B"));
    assert_eq!(
        contents(&target).iter().map(|c| c.0).collect::<Vec<_>>(),
        [ids[2]]
    );
    assert_eq!(target.held_pools().unwrap(), ["B"]);
    let (_, summary) = exported(&spool, Some("A"));
    let (file, _) = exported(&spool, Some("A"));
    assert_eq!(summary.total().messages, 2);
    let target = MemorySpool::new();
    block_on(import(&target, file.as_slice(), true));
    assert!(target.held_pools().unwrap().is_empty());
}

#[test]
fn a_check_writes_nothing() {
    let (spool, _) = source();
    let (file, summary) = exported(&spool, None);
    let target = MemorySpool::new();
    let checked = block_on(import(&target, file.as_slice(), false));
    assert!(checked.error.is_none());
    assert_eq!((checked.summary, checked.stored), (summary, 0));
    assert!(contents(&target).is_empty() && target.held_pools().unwrap().is_empty());
}

/// Whatever prefix of the file is given, the import refuses it and keeps
/// exactly the complete records before the cut, never anything else.
#[test]
fn a_truncated_file_is_refused_after_importing_the_records_before_the_cut() {
    let (spool, _) = source();
    let (file, _) = exported(&spool, None);
    let all = contents(&spool);
    for cut in 0..file.len() {
        let target = MemorySpool::new();
        let done = block_on(import(&target, &file[..cut], true));
        let error = done.error.expect("a cut file is refused").to_string();
        assert!(
            error.contains("truncated") || error.contains("not a poolrelay spool export"),
            "cut at {cut}: {error}"
        );
        let got = contents(&target);
        assert_eq!(got.len() as u64, done.stored);
        let mut expected: Vec<_> = all.clone();
        expected.retain(|m| got.iter().any(|g| g.0 == m.0));
        assert_eq!(got, expected, "cut at {cut}");
        assert!(
            target.held_pools().unwrap().is_empty(),
            "holds only after the trailer"
        );
    }
}

#[test]
fn every_damaged_byte_is_refused_naming_where() {
    let (spool, _) = source();
    let (file, _) = exported(&spool, None);
    for at in 0..file.len() {
        let mut damaged = file.clone();
        damaged[at] ^= 0x5A;
        let target = MemorySpool::new();
        let done = block_on(import(&target, damaged.as_slice(), true));
        let error = done
            .error
            .unwrap_or_else(|| panic!("byte {at} damaged, accepted"));
        let text = error.to_string();
        assert!(
            [
                "header",
                "record",
                "trailer",
                "not a poolrelay",
                "version",
                "truncated"
            ]
            .iter()
            .any(|w| text.contains(w)),
            "byte {at}: {text}"
        );
        assert!(contents(&target).len() as u64 == done.stored);
    }
}

/// A record with valid checksums but hostile contents.
fn forged(id: QueueId, envelope: &[u8], body_len: u64, body: &[u8]) -> Vec<u8> {
    let mut file = Vec::new();
    // The header alone: the record below is written by hand.
    Writer::new(
        &mut file,
        &Header {
            created_ms: 1,
            pool: None,
            held: vec![],
        },
    )
    .unwrap();
    let fixed = record_fixed(id, envelope.len() as u32, body_len);
    file.extend_from_slice(&fixed);
    file.extend_from_slice(&crc32fast::hash(&fixed).to_be_bytes());
    file.extend_from_slice(envelope);
    file.extend_from_slice(body);
    let mut crc = crc32fast::Hasher::new();
    crc.update(envelope);
    crc.update(body);
    file.extend_from_slice(&crc.finalize().to_be_bytes());
    file
}

#[test]
fn a_record_claiming_4_gb_is_refused_before_reading_it() {
    let file = forged(7, b"{}", 4 << 30, b"");
    let error = block_on(import(&MemorySpool::new(), file.as_slice(), true))
        .error
        .unwrap()
        .to_string();
    assert!(
        error.starts_with("record 1: queue id 0000000000000007: message claims 4294967296 bytes"),
        "{error}"
    );
}

#[test]
fn a_pool_name_the_spool_would_not_store_is_refused() {
    let (spool, ids) = source();
    let mut env = spool.envelope(ids[0], "A").unwrap().unwrap();
    env.pool = "../etc".into();
    let json = serde_json::to_vec(&env).unwrap();
    let file = forged(ids[0], &json, 2, b"hi");
    let target = MemorySpool::new();
    let error = block_on(import(&target, file.as_slice(), true))
        .error
        .unwrap()
        .to_string();
    assert!(
        error.contains("record 1") && error.contains("invalid pool name"),
        "{error}"
    );
    assert!(contents(&target).is_empty());
    let error = block_on(import(
        &target,
        forged(1, b"not json", 0, b"").as_slice(),
        true,
    ))
    .error
    .unwrap()
    .to_string();
    assert!(
        error.contains("record 1") && error.contains("unreadable envelope"),
        "{error}"
    );
}

#[test]
fn another_message_under_the_same_id_stops_the_import() {
    let (spool, ids) = source();
    let (file, _) = exported(&spool, None);
    let target = MemorySpool::new();
    let env = spool.envelope(ids[1], "A").unwrap().unwrap();
    assert_eq!(
        block_on(target.insert_with_id(ids[1], env, b"other".to_vec())).unwrap(),
        Inserted::Stored
    );
    let done = block_on(import(&target, file.as_slice(), true));
    let error = done.error.unwrap().to_string();
    assert!(
        error.starts_with(&format!("record 2 (queue id {})", format_id(ids[1])))
            && error.contains("another message"),
        "{error}"
    );
}

#[test]
fn bytes_after_the_trailer_and_other_versions_are_refused() {
    let (spool, _) = source();
    let (mut file, _) = exported(&spool, None);
    file.push(0);
    let error = block_on(import(&MemorySpool::new(), file.as_slice(), false))
        .error
        .unwrap();
    assert!(
        error.to_string().contains("bytes follow the trailer"),
        "{error}"
    );
    // A version 2 file with a valid header checksum.
    let mut v2 = Vec::new();
    let head = [&2u16.to_be_bytes()[..], &2u32.to_be_bytes(), b"{}"].concat();
    v2.extend_from_slice(MAGIC);
    v2.extend_from_slice(&head);
    v2.extend_from_slice(&crc32fast::hash(&head).to_be_bytes());
    let error = block_on(import(&MemorySpool::new(), v2.as_slice(), false))
        .error
        .unwrap();
    assert!(
        matches!(error, TransferError::Format(FormatError::Version(2))),
        "{error}"
    );
}

#[test]
fn the_summary_is_a_table_with_totals() {
    let (spool, _) = source();
    let (_, summary) = exported(&spool, None);
    let text = summary.to_string();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[1], ["A", "2", "2", "11"]);
    assert_eq!(lines[2], ["B", "1", "1", "3"]);
    assert_eq!(lines[3], ["total", "3", "3", "14"]);
}
