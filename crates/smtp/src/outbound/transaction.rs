//! Transactions on an open session: MAIL, RCPT, DATA and the content,
//! RSET and QUIT, pipelined when the upstream offers PIPELINING.

use super::connect::Client;
use super::types::{ClientError, DeliveryReport, OutboundEnvelope, RecipientDsn, stage};
use crate::data::DataEncoder;
use crate::reply::Reply;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

/// Content is encoded and written in blocks of this many input bytes.
const BLOCK: usize = 64 * 1024;

impl Client {
    /// Runs one transaction: MAIL, every RCPT (pipelined when offered),
    /// DATA only if a recipient was accepted, the dot-stuffed body.
    /// `message` is unstuffed with CRLF line ends. A message with an
    /// MT-PRIORITY goes to an upstream without the extension with its
    /// `MT-Priority:` header field set instead; otherwise every
    /// `MT-Priority:` field is removed.
    ///
    /// On `Ok` no transaction is left open, so the next `send` may follow
    /// directly (RSET is sent here when the transaction stopped before the
    /// content). A [`ClientError::Rejected`] at [`stage::MAIL`] with a
    /// reply other than 421 also leaves the connection usable;
    /// [`Client::is_usable`] tells.
    /// Addresses containing control characters or angle brackets are never
    /// sent: a bad sender fails the transaction with a local 501 5.1.7, a
    /// bad recipient gets a local 501 5.1.3 in the report. An envelope
    /// without recipients sends nothing and returns an empty report.
    pub async fn send(
        &mut self,
        envelope: &OutboundEnvelope,
        message: &[u8],
    ) -> Result<DeliveryReport, ClientError> {
        self.ensure_usable()?;
        let t = self.timeouts;
        if envelope.recipients.is_empty() {
            return Ok(DeliveryReport {
                recipients: Vec::new(),
                data: None,
            });
        }
        if !path_is_safe(&envelope.sender) {
            return Err(ClientError::Rejected {
                stage: stage::MAIL,
                reply: local_reply("5.1.7", "invalid sender address, not sent"),
            });
        }
        // RFC 6758 §4: past an upstream without the extension the
        // priority travels in the header, replacing any the message had.
        // Otherwise (a parameter, or no priority) no `MT-Priority:` field
        // goes on: a client's own would claim a priority the relay never
        // granted to whoever reads it downstream.
        let rewritten = match envelope.mt_priority {
            Some(value) if !self.caps.mt_priority => {
                std::borrow::Cow::Owned(crate::mt_priority::set_header(message, value))
            }
            _ => crate::mt_priority::remove_header(message),
        };
        let message: &[u8] = &rewritten;
        if let Some(reply) = self.unsendable(envelope, message) {
            return Err(ClientError::Rejected {
                stage: stage::MAIL,
                reply,
            });
        }
        let mail = self.mail_command(envelope, message.len());
        // None: refused locally, never sent.
        let rcpts: Vec<Option<String>> = envelope
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| self.rcpt_command(r, envelope.dsn.get(i)))
            .collect();
        let mut results = Vec::with_capacity(rcpts.len());

        if self.caps.pipelining {
            // One write for a pending RSET, MAIL and every RCPT, then the
            // replies in order.
            let rset = std::mem::take(&mut self.rset_pending);
            let mut batch = if rset {
                b"RSET\r\n".to_vec()
            } else {
                Vec::new()
            };
            batch.extend_from_slice(mail.as_bytes());
            for cmd in rcpts.iter().flatten() {
                batch.extend_from_slice(cmd.as_bytes());
            }
            self.write(&batch, stage::MAIL, t.mail).await?;
            if rset {
                let reply = self.read_reply(stage::RSET, t.mail).await?;
                if !reply.is_positive() {
                    // A server that refuses RSET is in a state we cannot reason about.
                    self.usable = false;
                    return Err(ClientError::Rejected {
                        stage: stage::RSET,
                        reply,
                    });
                }
            }
            let mail_reply = self.read_reply(stage::MAIL, t.mail).await?;
            self.expect_final(&mail_reply)?;
            if mail_reply.code == 421 {
                return Err(ClientError::Rejected {
                    stage: stage::MAIL,
                    reply: mail_reply,
                });
            }
            // Read every RCPT reply even after a refused MAIL, so the
            // connection stays in step.
            for cmd in &rcpts {
                let reply = match cmd {
                    None => local_reply("5.1.3", "invalid recipient address, not sent"),
                    Some(_) => match self.rcpt_reply().await {
                        Ok(reply) => reply,
                        // Some servers hang up after refusing MAIL: the
                        // refusal is the news, not the lost connection.
                        Err(_) if !mail_reply.is_positive() => {
                            return Err(ClientError::Rejected {
                                stage: stage::MAIL,
                                reply: mail_reply,
                            });
                        }
                        Err(e) => return Err(e),
                    },
                };
                results.push(reply);
            }
            if !mail_reply.is_positive() {
                return Err(ClientError::Rejected {
                    stage: stage::MAIL,
                    reply: mail_reply,
                });
            }
        } else {
            let mail_reply = self.command(mail.as_bytes(), stage::MAIL, t.mail).await?;
            self.expect_final(&mail_reply)?;
            if !mail_reply.is_positive() {
                return Err(ClientError::Rejected {
                    stage: stage::MAIL,
                    reply: mail_reply,
                });
            }
            for cmd in &rcpts {
                let reply = match cmd {
                    None => local_reply("5.1.3", "invalid recipient address, not sent"),
                    Some(cmd) => {
                        self.write(cmd.as_bytes(), stage::RCPT, t.rcpt).await?;
                        self.rcpt_reply().await?
                    }
                };
                results.push(reply);
            }
        }

        if !results.iter().any(Reply::is_positive) {
            // Close the open transaction; a failure here only makes the
            // connection unusable, the per-recipient results stand.
            let _ = self.rset().await;
            return Ok(DeliveryReport {
                recipients: results,
                data: None,
            });
        }

        let reply = self
            .command(b"DATA\r\n", stage::DATA_INIT, t.data_init)
            .await?;
        if reply.code == 421 {
            return Err(ClientError::Rejected {
                stage: stage::DATA_INIT,
                reply,
            });
        }
        if reply.code != 354 {
            if !(reply.is_transient() || reply.is_permanent()) {
                // A 2xx here would read as "delivered": never trust it.
                self.usable = false;
                return Err(ClientError::Io(format!(
                    "unexpected reply to DATA: {reply}"
                )));
            }
            let _ = self.rset().await;
            return Ok(DeliveryReport {
                recipients: results,
                data: Some(reply),
            });
        }

        self.write_body(message).await?;
        let reply = self.read_reply(stage::DATA_END, t.data_end).await?;
        self.expect_final(&reply)?;
        if reply.code == 421 {
            return Err(ClientError::Rejected {
                stage: stage::DATA_END,
                reply,
            });
        }
        Ok(DeliveryReport {
            recipients: results,
            data: Some(reply),
        })
    }

    /// RSET between transactions on a reused connection. With PIPELINING
    /// it is only noted and goes out in the next `send`'s first write,
    /// saving a round trip; a refusal then comes from that `send`, at
    /// [`stage::RSET`].
    pub async fn rset(&mut self) -> Result<(), ClientError> {
        self.ensure_usable()?;
        if self.caps.pipelining {
            self.rset_pending = true;
            return Ok(());
        }
        let reply = self
            .command(b"RSET\r\n", stage::RSET, self.timeouts.mail)
            .await?;
        if reply.is_positive() {
            return Ok(());
        }
        // A server that refuses RSET is in a state we cannot reason about.
        self.usable = false;
        Err(ClientError::Rejected {
            stage: stage::RSET,
            reply,
        })
    }

    /// QUIT and close, ignoring errors.
    pub async fn quit(mut self) {
        if self.usable {
            // Short: nothing depends on the answer.
            let limit = self.timeouts.mail.min(Duration::from_secs(10));
            let _ = self.command(b"QUIT\r\n", stage::QUIT, limit).await;
        }
        let _ = timeout(Duration::from_secs(1), self.io.get_mut().shutdown()).await;
    }

    /// Refuses to speak on a connection whose SMTP state is unknown.
    fn ensure_usable(&self) -> Result<(), ClientError> {
        if self.usable {
            Ok(())
        } else {
            Err(ClientError::Io(format!(
                "connection to {} is no longer usable",
                self.peer
            )))
        }
    }

    /// Why this message cannot go to this upstream at all, as the
    /// permanent reply its recipients get: SMTPUTF8 mail to an upstream
    /// without SMTPUTF8 (RFC 6531 §3.2: 5.6.7), and 8-bit content to one
    /// without 8BITMIME (RFC 6152 §3: we do not convert, so 5.6.3).
    /// A message merely flagged 8BITMIME whose bytes are all 7-bit goes.
    pub(crate) fn unsendable(&self, envelope: &OutboundEnvelope, message: &[u8]) -> Option<Reply> {
        if envelope.smtputf8 && !self.caps.smtputf8 {
            return Some(Reply {
                code: 553,
                enhanced: Some("5.6.7".into()),
                text: "the message needs SMTPUTF8, which the upstream does not offer".into(),
            });
        }
        if !self.caps.eightbitmime && message.iter().any(|b| *b >= 0x80) {
            return Some(Reply {
                code: 554,
                enhanced: Some("5.6.3".into()),
                text: "8-bit content, and the upstream does not offer 8BITMIME".into(),
            });
        }
        None
    }

    /// `MAIL FROM:<sender>` with only the parameters the upstream
    /// offered: others would get the whole transaction refused.
    fn mail_command(&self, envelope: &OutboundEnvelope, size: usize) -> String {
        let mut cmd = format!("MAIL FROM:<{}>", envelope.sender);
        if envelope.body_8bit && self.caps.eightbitmime {
            cmd.push_str(" BODY=8BITMIME");
        }
        if envelope.smtputf8 && self.caps.smtputf8 {
            cmd.push_str(" SMTPUTF8");
        }
        if self.caps.size.is_some() {
            cmd.push_str(&format!(" SIZE={size}"));
        }
        if let (true, Some(value)) = (self.caps.mt_priority, envelope.mt_priority) {
            cmd.push_str(&format!(" MT-PRIORITY={value}"));
        }
        if self.caps.dsn {
            match envelope.ret_full {
                Some(true) => cmd.push_str(" RET=FULL"),
                Some(false) => cmd.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &envelope.envid {
                cmd.push_str(" ENVID=");
                cmd.push_str(&xtext(envid));
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    /// `RCPT TO:<address>` with NOTIFY and ORCPT when the upstream offers
    /// DSN; `None` when the address cannot be sent safely.
    fn rcpt_command(&self, address: &str, dsn: Option<&RecipientDsn>) -> Option<String> {
        if !path_is_safe(address) {
            return None;
        }
        let mut cmd = format!("RCPT TO:<{address}>");
        if let (true, Some(dsn)) = (self.caps.dsn, dsn) {
            if let Some(notify) = notify_keywords(dsn.notify) {
                cmd.push_str(" NOTIFY=");
                cmd.push_str(&notify);
            }
            if let Some(orcpt) = &dsn.orcpt {
                // Only rfc822 is forwarded; a bare address is taken as one.
                let original = orcpt
                    .get(..7)
                    .filter(|t| t.eq_ignore_ascii_case("rfc822;"))
                    .map_or(orcpt.as_str(), |_| &orcpt[7..]);
                cmd.push_str(" ORCPT=rfc822;");
                cmd.push_str(&xtext(original));
            }
        }
        cmd.push_str("\r\n");
        Some(cmd)
    }

    /// One RCPT reply; 421 ends the session for every recipient, so it is
    /// an error rather than this recipient's result.
    async fn rcpt_reply(&mut self) -> Result<Reply, ClientError> {
        let reply = self.read_reply(stage::RCPT, self.timeouts.rcpt).await?;
        self.expect_final(&reply)?;
        if reply.code == 421 {
            return Err(ClientError::Rejected {
                stage: stage::RCPT,
                reply,
            });
        }
        Ok(reply)
    }

    /// MAIL, RCPT and the dot get 2xx, 4xx or 5xx; anything else means
    /// we and the upstream disagree about where we are.
    fn expect_final(&mut self, reply: &Reply) -> Result<(), ClientError> {
        if reply.is_positive() || reply.is_transient() || reply.is_permanent() {
            Ok(())
        } else {
            self.usable = false;
            Err(ClientError::Io(format!("unexpected reply {reply}")))
        }
    }

    /// Writes the dot-stuffed content and the final dot in blocks, each
    /// within `data_block`: a slow but moving upstream is not cut off by
    /// one timeout for the whole message.
    async fn write_body(&mut self, message: &[u8]) -> Result<(), ClientError> {
        let limit = self.timeouts.data_block;
        let mut encoder = DataEncoder::new();
        let mut block = Vec::with_capacity(BLOCK.min(message.len()) * 2 + 8);
        let mut chunks = message.chunks(BLOCK).peekable();
        while let Some(chunk) = chunks.next() {
            encoder.encode(chunk, &mut block);
            if chunks.peek().is_some() {
                self.write(&block, stage::DATA_BLOCK, limit).await?;
                block.clear();
            }
        }
        // The last block carries the final dot: one write for small messages.
        encoder.finish(&mut block);
        self.write(&block, stage::DATA_BLOCK, limit).await
    }
}

/// A reply made up here for something never sent, so the caller sees a
/// permanent failure for it instead of an error for the whole connection.
fn local_reply(enhanced: &str, text: &str) -> Reply {
    Reply {
        code: 501,
        enhanced: Some(enhanced.to_string()),
        text: text.to_string(),
    }
}

/// NOTIFY's value for smtp-proto's `RCPT_NOTIFY_*` bits; `None` for 0.
fn notify_keywords(bits: u64) -> Option<String> {
    if bits & smtp_proto::RCPT_NOTIFY_NEVER != 0 {
        return Some("NEVER".into());
    }
    let keywords: Vec<&str> = [
        (smtp_proto::RCPT_NOTIFY_SUCCESS, "SUCCESS"),
        (smtp_proto::RCPT_NOTIFY_FAILURE, "FAILURE"),
        (smtp_proto::RCPT_NOTIFY_DELAY, "DELAY"),
    ]
    .into_iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, keyword)| keyword)
    .collect();
    (!keywords.is_empty()).then(|| keywords.join(","))
}

/// xtext (RFC 3461 §4): `!`..=`~` except `+` and `=` as is, every other
/// byte as `+XX` (upper-case hex). Never contains space, CR or LF.
fn xtext(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// Whether an address can go between angle brackets without changing the
/// command: CR/LF would inject commands, brackets would end the path.
/// Everything else is the upstream's to judge.
fn path_is_safe(address: &str) -> bool {
    !address
        .chars()
        .any(|c| c.is_control() || c == '<' || c == '>')
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[tokio::test]
    async fn pipelined_per_recipient_results() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            // Read MAIL and every RCPT before answering anything: a client
            // that waits for the MAIL reply would hang here.
            let mail = p.expect("MAIL FROM:<owner-list@lists.test>").await;
            let rcpts = [
                p.expect("RCPT TO:<a@x.test>").await,
                p.expect("RCPT TO:<b@x.test>").await,
                p.expect("RCPT TO:<c@x.test>").await,
            ];
            p.send(
                "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.2.1 try later\r\n\
550-5.1.1 no such\r\n550 5.1.1 user\r\n",
            )
            .await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 2.0.0 Ok: queued as XYZ\r\n").await;
            p.expect("QUIT").await;
            p.send("221 2.0.0 bye\r\n").await;
            (mail, rcpts, body)
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        assert!(client.pipelining());
        let caps = client.capabilities();
        assert_eq!(caps.size, Some(1_000_000));
        assert!(caps.eightbitmime && caps.dsn && caps.enhanced_status_codes);
        assert_eq!(caps.auth, ["LOGIN", "PLAIN"]);
        assert!(!caps.smtputf8 && !caps.starttls);
        let message = b"Subject: t\r\n\r\nhello\r\n";
        let report =
            bounded(client.send(&envelope(&["a@x.test", "b@x.test", "c@x.test"]), message))
                .await
                .unwrap();
        let codes: Vec<u16> = report.recipients.iter().map(|r| r.code).collect();
        assert_eq!(codes, [250, 451, 550]);
        assert_eq!(report.recipients[2].enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(report.recipients[2].text, "no such user");
        let data = report.data.clone().unwrap();
        assert_eq!((data.code, data.enhanced.as_deref()), (250, Some("2.0.0")));
        assert_eq!(data.text, "Ok: queued as XYZ");
        // Only the accepted recipient is covered by the DATA reply.
        let outcomes: Vec<u16> = (0..3).map(|i| report.outcome(i).unwrap().code).collect();
        assert_eq!(outcomes, [250, 451, 550]);
        assert!(client.is_usable());
        bounded(client.quit()).await;
        let (mail, _, body) = server.await.unwrap();
        assert_eq!(
            mail,
            format!(
                "MAIL FROM:<owner-list@lists.test> BODY=8BITMIME SIZE={}\r\n",
                message.len()
            )
        );
        assert_eq!(body, b"Subject: t\r\n\r\nhello\r\n.\r\n");
    }

    #[tokio::test]
    async fn mail_the_upstream_cannot_take_is_refused_before_mail_with_a_permanent_status() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            // Neither 8BITMIME nor SMTPUTF8 offered.
            p.greet("250-up.test\r\n250 PIPELINING\r\n").await;
            // The 7-bit message flagged 8BITMIME still goes (without BODY=).
            p.expect("MAIL FROM:<s@x.test>\r\n").await;
            p.send("250 ok\r\n").await;
            p.expect("RCPT TO:<a@x.test>").await;
            p.send("250 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let _ = p.body().await;
            p.send("250 ok\r\n").await;
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        let mut env = envelope(&["a@x.test"]);
        env.sender = "s@x.test".into();
        env.smtputf8 = true;
        let refused = bounded(client.send(&env, b"Subject: x\r\n\r\nhi\r\n")).await;
        match refused {
            Err(e @ ClientError::Rejected { .. }) => {
                assert!(e.is_about_message(), "{e}");
                let ClientError::Rejected { reply, .. } = e else {
                    unreachable!()
                };
                assert_eq!((reply.code, reply.status()), (553, "5.6.7".to_string()));
            }
            other => panic!("SMTPUTF8 mail to an upstream without SMTPUTF8: {other:?}"),
        }
        env.smtputf8 = false;
        env.body_8bit = true;
        let refused = bounded(client.send(&env, "Subject: x\r\n\r\nh\u{e9}\r\n".as_bytes())).await;
        match refused {
            Err(ClientError::Rejected { reply, .. }) => assert_eq!(reply.status(), "5.6.3"),
            other => panic!("8-bit content to an upstream without 8BITMIME: {other:?}"),
        }
        let report = bounded(client.send(&env, b"Subject: x\r\n\r\nplain\r\n"))
            .await
            .unwrap();
        assert!(report.data.is_some_and(|r| r.is_positive()));
        bounded(server).await.unwrap();
    }

    #[tokio::test]
    async fn dot_stuffing_on_the_wire() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PLAIN).await;
            p.expect("MAIL FROM:<> BODY=8BITMIME\r\n").await;
            p.send("250 ok\r\n").await;
            p.expect("RCPT TO:<a@x.test>").await;
            p.send("250 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 ok\r\n").await;
            body
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        assert!(!client.pipelining());
        let mut env = envelope(&["a@x.test"]);
        env.sender.clear();
        let report = bounded(client.send(&env, b".hello\r\n..x\r\nline\r\n.\r\nend"))
            .await
            .unwrap();
        let data = report.data.unwrap();
        assert_eq!((data.code, data.enhanced), (250, None));
        let body = server.await.unwrap();
        assert_eq!(body, b"..hello\r\n...x\r\nline\r\n..\r\nend\r\n.\r\n");
    }

    #[tokio::test]
    async fn big_message_in_blocks() {
        let (listener, addr) = listener().await;
        let mut message = Vec::new();
        for i in 0..20_000 {
            message.extend_from_slice(format!(".line {i}\r\n").as_bytes());
        }
        let expect: Vec<u8> = {
            let mut e = Vec::new();
            for i in 0..20_000 {
                e.extend_from_slice(format!("..line {i}\r\n").as_bytes());
            }
            e.extend_from_slice(b".\r\n");
            e
        };
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            p.expect("MAIL").await;
            p.expect("RCPT").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 2.0.0 ok\r\n").await;
            body
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        let report = bounded(client.send(&envelope(&["a@x.test"]), &message))
            .await
            .unwrap();
        assert_eq!(report.data.unwrap().code, 250);
        assert_eq!(server.await.unwrap(), expect);
    }

    #[tokio::test]
    async fn connection_reuse_with_rset() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            // 1: every recipient refused -> the client resets by itself.
            p.expect("MAIL").await;
            p.expect("RCPT TO:<a@x.test>").await;
            p.send("250 2.1.0 ok\r\n550 5.7.1 no\r\n").await;
            p.expect("RSET\r\n").await;
            p.send("250 2.0.0 ok\r\n").await;
            // 2: DATA refused -> report, then RSET.
            p.expect("MAIL").await;
            p.expect("RCPT TO:<b@x.test>").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("554 5.6.0 no content wanted\r\n").await;
            p.expect("RSET\r\n").await;
            p.send("250 2.0.0 ok\r\n").await;
            // 3: MAIL refused -> error, connection still usable.
            p.expect("MAIL").await;
            p.expect("RCPT TO:<c@x.test>").await;
            p.send("452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n").await;
            // The caller's own RSET, then a good transaction.
            p.expect("RSET\r\n").await;
            p.send("250 2.0.0 ok\r\n").await;
            p.expect("MAIL").await;
            p.expect("RCPT TO:<d@x.test>").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 2.0.0 queued\r\n").await;
            p.expect("QUIT").await;
            p.send("221 2.0.0 bye\r\n").await;
            body
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();

        let r = bounded(client.send(&envelope(&["a@x.test"]), b"m\r\n"))
            .await
            .unwrap();
        assert_eq!(r.recipients[0].code, 550);
        assert!(r.data.is_none());
        assert_eq!(r.outcome(0).unwrap().code, 550);

        let r = bounded(client.send(&envelope(&["b@x.test"]), b"m\r\n"))
            .await
            .unwrap();
        assert_eq!(r.recipients[0].code, 250);
        assert_eq!(r.data.as_ref().unwrap().code, 554);
        assert_eq!(r.outcome(0).unwrap().code, 554);

        let err = bounded(client.send(&envelope(&["c@x.test"]), b"m\r\n"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Rejected { stage: stage::MAIL, reply } if reply.code == 452),
            "{err:?}"
        );
        assert!(client.is_usable());
        bounded(client.rset()).await.unwrap();

        let r = bounded(client.send(&envelope(&["d@x.test"]), b"last"))
            .await
            .unwrap();
        assert_eq!(r.data.unwrap().code, 250);
        bounded(client.quit()).await;
        assert_eq!(server.await.unwrap(), b"last\r\n.\r\n");
    }

    #[tokio::test]
    async fn rcpt_421_makes_the_connection_unusable() {
        let (listener, addr) = listener().await;
        tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PLAIN).await;
            p.expect("MAIL").await;
            p.send("250 ok\r\n").await;
            p.expect("RCPT").await;
            p.send("421 4.4.2 shutting down\r\n").await;
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        let err = bounded(client.send(&envelope(&["a@x.test", "b@x.test"]), b"m"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                ClientError::Rejected {
                    stage: stage::RCPT,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!client.is_usable());
        assert!(matches!(
            bounded(client.rset()).await,
            Err(ClientError::Io(_))
        ));
    }

    #[tokio::test]
    async fn unsafe_addresses_are_never_sent() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            p.expect("MAIL").await;
            p.expect("RCPT TO:<ok@x.test>").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            p.body().await;
            p.send("250 2.0.0 ok\r\n").await;
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        let env = envelope(&["evil@x\r\nRCPT TO:<other@y>", "ok@x.test"]);
        let r = bounded(client.send(&env, b"m\r\n")).await.unwrap();
        assert_eq!(r.recipients[0].code, 501);
        assert_eq!(r.recipients[1].code, 250);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn dsn_parameters_only_when_offered() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for ehlo in [EHLO_PIPELINING, EHLO_PLAIN] {
                let mut p = Peer::accept(&listener).await;
                p.greet(ehlo).await;
                let mut lines = vec![p.expect("MAIL").await];
                if ehlo == EHLO_PLAIN {
                    p.send("250 ok\r\n").await;
                }
                for _ in 0..3 {
                    lines.push(p.expect("RCPT").await);
                    if ehlo == EHLO_PLAIN {
                        p.send("250 ok\r\n").await;
                    }
                }
                if ehlo == EHLO_PIPELINING {
                    p.send("250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n").await;
                }
                p.expect("DATA").await;
                p.send("354 go\r\n").await;
                p.body().await;
                p.send("250 ok\r\n").await;
                seen.push(lines);
            }
            seen
        });
        let mut env = envelope(&["a@x.test", "b@x.test", "c@x.test"]);
        env.envid = Some("QQ+1= x".into());
        env.ret_full = Some(false);
        env.dsn = vec![
            RecipientDsn {
                notify: smtp_proto::RCPT_NOTIFY_SUCCESS | smtp_proto::RCPT_NOTIFY_FAILURE,
                orcpt: Some("rfc822;o+x@y.test".into()),
            },
            RecipientDsn {
                notify: smtp_proto::RCPT_NOTIFY_NEVER | smtp_proto::RCPT_NOTIFY_DELAY,
                orcpt: Some("bare=é@y.test".into()),
            },
            // c@x.test has no entry.
        ];
        for _ in 0..2 {
            let mut client = bounded(Client::connect(addr, "relay.test", quick()))
                .await
                .unwrap();
            let report = bounded(client.send(&env, b"m\r\n")).await.unwrap();
            assert_eq!(report.outcome(2).unwrap().code, 250);
        }
        let seen = server.await.unwrap();
        assert_eq!(
            seen[0],
            [
                "MAIL FROM:<owner-list@lists.test> BODY=8BITMIME SIZE=3 RET=HDRS ENVID=QQ+2B1+3D+20x\r\n",
                "RCPT TO:<a@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o+2Bx@y.test\r\n",
                "RCPT TO:<b@x.test> NOTIFY=NEVER ORCPT=rfc822;bare+3D+C3+A9@y.test\r\n",
                "RCPT TO:<c@x.test>\r\n",
            ]
        );
        assert_eq!(
            seen[1],
            [
                "MAIL FROM:<owner-list@lists.test> BODY=8BITMIME\r\n",
                "RCPT TO:<a@x.test>\r\n",
                "RCPT TO:<b@x.test>\r\n",
                "RCPT TO:<c@x.test>\r\n",
            ]
        );
    }

    #[tokio::test]
    async fn mt_priority_as_a_parameter_or_as_a_header() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for ehlo in [
                "250-up.test\r\n250-MT-PRIORITY MIXER\r\n250 SIZE 1000\r\n",
                "250-up.test\r\n250 SIZE 1000\r\n",
                "250-up.test\r\n250 SIZE 1000\r\n",
            ] {
                let mut p = Peer::accept(&listener).await;
                p.greet(ehlo).await;
                let mail = p.expect("MAIL").await;
                p.send("250 ok\r\n").await;
                p.expect("RCPT").await;
                p.send("250 ok\r\n").await;
                p.expect("DATA").await;
                p.send("354 go\r\n").await;
                let body = p.body().await;
                p.send("250 ok\r\n").await;
                seen.push((mail, String::from_utf8(body).unwrap()));
            }
            seen
        });
        let mut env = envelope(&["a@x.test"]);
        env.body_8bit = false;
        env.mt_priority = Some(6);
        let message = b"MT-Priority: 2\r\nSubject: s\r\n\r\n.dot\r\n";
        for priority in [Some(6), Some(6), None] {
            env.mt_priority = priority;
            let mut client = bounded(Client::connect(addr, "relay.test", quick()))
                .await
                .unwrap();
            bounded(client.send(&env, message)).await.unwrap();
        }
        let seen = server.await.unwrap();
        // The parameter, and no field of the message's own.
        assert_eq!(
            seen[0],
            (
                "MAIL FROM:<owner-list@lists.test> SIZE=20 MT-PRIORITY=6\r\n".to_string(),
                "Subject: s\r\n\r\n..dot\r\n.\r\n".to_string()
            )
        );
        // No priority: no field either.
        assert_eq!(
            seen[2],
            (
                "MAIL FROM:<owner-list@lists.test> SIZE=20\r\n".to_string(),
                "Subject: s\r\n\r\n..dot\r\n.\r\n".to_string()
            )
        );
        assert_eq!(
            seen[1],
            (
                "MAIL FROM:<owner-list@lists.test> SIZE=36\r\n".to_string(),
                "Subject: s\r\nMT-Priority: 6\r\n\r\n..dot\r\n.\r\n".to_string()
            )
        );
    }

    #[test]
    fn xtext_and_notify() {
        assert_eq!(xtext("a@b.test"), "a@b.test");
        assert_eq!(xtext("+=\r\n ~!"), "+2B+3D+0D+0A+20~!");
        assert_eq!(notify_keywords(0), None);
        assert_eq!(
            notify_keywords(smtp_proto::RCPT_NOTIFY_DELAY | smtp_proto::RCPT_NOTIFY_SUCCESS)
                .as_deref(),
            Some("SUCCESS,DELAY")
        );
        assert_eq!(
            notify_keywords(smtp_proto::RCPT_NOTIFY_NEVER | smtp_proto::RCPT_NOTIFY_FAILURE)
                .as_deref(),
            Some("NEVER")
        );
    }
}
