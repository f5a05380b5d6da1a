//! The reference configurations end to end: each is imported with its host
//! names mapped to loopback sinks (`--host NAME=127.0.0.1:PORT`, one sink per
//! host), the relay runs the generated file unchanged, and mail shaped as
//! LISTSERV sends it (postings, administrative mail, command replies,
//! bounces) leaves only through the host the configuration says.

use poolrelay_tests::Sink;
use poolrelay_tests::listserv::{
    ListservMail, SenderForm, admin_mail, assert_only_at, command_reply, null_sender_mail, posting,
    reference, send, start_imported,
};

/// Where LISTSERV runs in ref1 and ref3 (no MYDOMAIN: any host is recognised).
const HOST: &str = "LISTSERV.EXAMPLE.ORG";

fn send_all(relay: &poolrelay_tests::Relay, mails: &[(&ListservMail, &str)]) {
    for (m, _) in mails {
        send(relay, m);
    }
}

/// ref1: the emergency list (Delivery-Pool=B, so its administrative mail is
/// B too) leaves through SCRAPPY; every other list, command replies and
/// bounces through SCOOBY.
#[test]
fn ref1_emergency_list_leaves_through_scrappy_everything_else_through_scooby() {
    let scooby = Sink::start();
    let scrappy = Sink::start();
    let relay = start_imported(
        &reference("ref1"),
        &[
            ("scooby.example.org", &scooby),
            ("scrappy.example.org", &scrappy),
        ],
    );
    let em_bare = posting("EMERGENCY", HOST, SenderForm::Bare);
    let em_named = posting("EMERGENCY", HOST, SenderForm::Named);
    let em_admin = admin_mail("EMERGENCY", HOST);
    let big_post = posting("BIGLIST", HOST, SenderForm::Named);
    let big_admin = admin_mail("BIGLIST", HOST);
    let reply = command_reply(HOST);
    let bounce = null_sender_mail(HOST);
    let mails = [
        (&em_bare, "SCRAPPY"),
        (&em_named, "SCRAPPY"),
        (&em_admin, "SCRAPPY"),
        (&big_post, "SCOOBY"),
        (&big_admin, "SCOOBY"),
        (&reply, "SCOOBY"),
        (&bounce, "SCOOBY"),
    ];
    send_all(&relay, &mails);
    assert_only_at(
        &relay,
        &[("SCOOBY", &scooby), ("SCRAPPY", &scrappy)],
        &mails,
    );
}

/// ref2: virtual domains. COMLIST (List-Address LISTSERV.EXAMPLE.COM,
/// Delivery-Pool=B) leaves through MTA.EXAMPLE.COM; ORGLIST (.ORG, A), lists
/// without Delivery-Pool, command replies of both domains and bounces (pools
/// A and `-`) through MTA.EXAMPLE.ORG.
#[test]
fn ref2_each_virtual_domain_list_leaves_through_its_own_mta() {
    let mta_org = Sink::start();
    let mta_com = Sink::start();
    let relay = start_imported(
        &reference("ref2"),
        &[("mta.example.org", &mta_org), ("mta.example.com", &mta_com)],
    );
    let org = "LISTSERV.EXAMPLE.ORG";
    let com = "LISTSERV.EXAMPLE.COM";
    let com_post = posting("COMLIST", com, SenderForm::Named);
    let com_post_bare = posting("COMLIST", com, SenderForm::Bare);
    let com_admin = admin_mail("COMLIST", com);
    let org_post = posting("ORGLIST", org, SenderForm::Named);
    let org_admin = admin_mail("ORGLIST", org);
    let other_list = posting("OTHERLIST", org, SenderForm::Bare);
    let reply_org = command_reply(org);
    let reply_com = command_reply(com);
    let bounce = null_sender_mail(org);
    let mails = [
        (&com_post, "MTA.EXAMPLE.COM"),
        (&com_post_bare, "MTA.EXAMPLE.COM"),
        (&com_admin, "MTA.EXAMPLE.COM"),
        (&org_post, "MTA.EXAMPLE.ORG"),
        (&org_admin, "MTA.EXAMPLE.ORG"),
        (&other_list, "MTA.EXAMPLE.ORG"),
        (&reply_org, "MTA.EXAMPLE.ORG"),
        (&reply_com, "MTA.EXAMPLE.ORG"),
        (&bounce, "MTA.EXAMPLE.ORG"),
    ];
    send_all(&relay, &mails);
    assert_only_at(
        &relay,
        &[("MTA.EXAMPLE.ORG", &mta_org), ("MTA.EXAMPLE.COM", &mta_com)],
        &mails,
    );
}

/// ref3: backscatter isolation. Postings of the Delivery-Pool=B,A list (a
/// Sender: header naming the list, in either form) leave through SCRAPPY, its
/// administrative mail through SCOOBY with the other lists, and command
/// replies, bounces and other non-list mail only through SHAGGY.
#[test]
fn ref3_postings_via_scrappy_admin_mail_via_scooby_replies_and_bounces_only_via_shaggy() {
    let scooby = Sink::start();
    let scrappy = Sink::start();
    let shaggy = Sink::start();
    let relay = start_imported(
        &reference("ref3"),
        &[
            ("scooby.example.org", &scooby),
            ("scrappy.example.org", &scrappy),
            ("shaggy.example.org", &shaggy),
        ],
    );
    let em_bare = posting("EMERGENCY", HOST, SenderForm::Bare);
    let em_named = posting("EMERGENCY", HOST, SenderForm::Named);
    let em_admin = admin_mail("EMERGENCY", HOST);
    let big_post = posting("BIGLIST", HOST, SenderForm::Named);
    let big_admin = admin_mail("BIGLIST", HOST);
    let reply = command_reply(HOST);
    let bounce = null_sender_mail(HOST);
    let mut postmaster = command_reply(HOST);
    postmaster.envelope_from = format!("postmaster@{HOST}");
    postmaster.what = "non-list mail from postmaster@".into();
    let mails = [
        (&em_bare, "SCRAPPY"),
        (&em_named, "SCRAPPY"),
        (&em_admin, "SCOOBY"),
        (&big_post, "SCOOBY"),
        (&big_admin, "SCOOBY"),
        (&reply, "SHAGGY"),
        (&bounce, "SHAGGY"),
        (&postmaster, "SHAGGY"),
    ];
    send_all(&relay, &mails);
    assert_only_at(
        &relay,
        &[
            ("SCOOBY", &scooby),
            ("SCRAPPY", &scrappy),
            ("SHAGGY", &shaggy),
        ],
        &mails,
    );
}

/// ref3, the edge of "a `Sender:` header naming `LIST@host`" (README.md,
/// "Choosing the pool: two ways"):
/// administrative mail of the Delivery-Pool=B,A list whose `Sender:` names
/// the list's owner address, `owner-EMERGENCY@`, does not name
/// `EMERGENCY@`, so it is not a posting: it stays administrative mail
/// (pool A, SCOOBY), not the postings lane (SCRAPPY).
#[test]
fn ref3_admin_mail_whose_sender_names_owner_list_is_not_a_posting() {
    let scooby = Sink::start();
    let scrappy = Sink::start();
    let shaggy = Sink::start();
    let relay = start_imported(
        &reference("ref3"),
        &[
            ("scooby.example.org", &scooby),
            ("scrappy.example.org", &scrappy),
            ("shaggy.example.org", &shaggy),
        ],
    );
    let mut owner_sender = admin_mail("EMERGENCY", HOST);
    owner_sender.text = format!("Sender: owner-EMERGENCY@{HOST}\r\n{}", owner_sender.text);
    owner_sender.what = "admin mail of EMERGENCY with Sender: owner-EMERGENCY@".into();
    let control = posting("EMERGENCY", HOST, SenderForm::Named);
    let mails = [(&owner_sender, "SCOOBY"), (&control, "SCRAPPY")];
    send_all(&relay, &mails);
    assert_only_at(
        &relay,
        &[
            ("SCOOBY", &scooby),
            ("SCRAPPY", &scrappy),
            ("SHAGGY", &shaggy),
        ],
        &mails,
    );
}

/// The other way to choose lanes (README, "Coming from LISTSERV", way b):
/// LISTSERV keeps deciding. Its pool-B worker points at a second address of
/// the relay, a listener with `pool = "B"`; everything accepted there leaves
/// through SCRAPPY whatever the routes say, and the first address routes as
/// usual. The config is the README's worked example on loopback.
#[test]
fn listserv_keeps_choosing_pool_b_by_sending_to_the_pinned_listener() {
    let scooby = Sink::start();
    let scrappy = Sink::start();
    let mut pinned = None;
    let relay = poolrelay_tests::Relay::start(|s| {
        let b = s.extra_listener();
        pinned = Some(b);
        format!(
            "[server]\nhostname = \"relay.example.org\"\nspool_dir = {spool}\n\
             hosts = {{ \"scooby.example.org\" = \"{scooby}\", \"scrappy.example.org\" = \"{scrappy}\" }}\n\n\
             [[listener]]\naddress = \"{main}\"\nname = \"listserv\"\nrelay_from = [\"127.0.0.1/32\"]\n\n\
             [[listener]]\naddress = \"{b}\"\nname = \"listserv-pool-b\"\nrelay_from = [\"127.0.0.1/32\"]\npool = \"B\"\n\n\
             [admin]\naddress = \"{admin}\"\n\n\
             [defaults]\nlist_pool = \"A\"\nfallback = [\"scooby.example.org\"]\n\n\
             [pool.A]\ndescription = \"list mail (LISTSERV pool A)\"\n\
             [pool.B]\ndescription = \"emergency lists (LISTSERV pool B)\"\n\n\
             [[upstream]]\nhost = \"scooby.example.org\"\nworkers = 2\npools = [\"A\", \"-\"]\n\n\
             [[upstream]]\nhost = \"scrappy.example.org\"\npools = [\"B\"]\n\n\
             [[route]]\npool = \"-\"\nsender = \"\"\n\n\
             [[route]]\npool = \"-\"\nsender = \"listserv@*\"\n",
            spool = poolrelay_tests::toml_str(&s.spool_dir.to_string_lossy()),
            scooby = scooby.addr(),
            scrappy = scrappy.addr(),
            main = s.listen,
            admin = s.admin,
        )
    });
    let pinned = pinned.expect("the pool-B listener");
    // LISTSERV's pool-B worker hands its mail to the pinned address: the
    // relay never saw this list's header, LISTSERV chose the pool.
    let em_post = posting("EMERGENCY", HOST, SenderForm::Named);
    let em_admin = admin_mail("EMERGENCY", HOST);
    // Even mail the routes would put in "-" goes to B on that address.
    let b_reply = command_reply(HOST);
    // LISTSERV's pool A and "-" workers hand theirs to the first address.
    let big_post = posting("BIGLIST", HOST, SenderForm::Bare);
    let reply = command_reply(HOST);
    let bounce = null_sender_mail(HOST);
    for m in [&em_post, &em_admin, &b_reply] {
        let r = relay.send_via(
            pinned,
            &m.envelope_from,
            &[poolrelay_tests::listserv::MEMBER],
            &m.text,
        );
        assert_eq!(r.code, 250, "{} via the pool-B address: {r}", m.what);
    }
    for m in [&big_post, &reply, &bounce] {
        send(&relay, m);
    }
    assert_only_at(
        &relay,
        &[("SCOOBY", &scooby), ("SCRAPPY", &scrappy)],
        &[
            (&em_post, "SCRAPPY"),
            (&em_admin, "SCRAPPY"),
            (&b_reply, "SCRAPPY"),
            (&big_post, "SCOOBY"),
            (&reply, "SCOOBY"),
            (&bounce, "SCOOBY"),
        ],
    );
}
