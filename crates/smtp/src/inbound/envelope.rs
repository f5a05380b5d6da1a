//! MAIL and RCPT: the envelope sender and recipients with their ESMTP
//! parameters (SIZE, BODY, SMTPUTF8, DSN's RET, ENVID, NOTIFY, ORCPT,
//! MT-PRIORITY),
//! checked before anything is accepted.

use std::borrow::Cow;

use smtp_proto::{MailFrom, RcptTo};

use super::syntax::*;
use super::*;

impl Session {
    /// `line`: the command as received, for what smtp-proto does not keep
    /// (whether the path was literally `<>`, quoting, raw xtext).
    pub(super) fn mail_from(
        &mut self,
        from: MailFrom<Cow<'_, str>>,
        line: &[u8],
        out: &mut Vec<Output>,
    ) {
        let empty = empty_path(line);
        if self.helo.is_none() {
            self.refuse(
                out,
                Rejection::Sequence,
                b"503 5.5.1 send HELO or EHLO first\r\n",
            );
            return;
        }
        if self.mail.is_some() {
            self.refuse(
                out,
                Rejection::Sequence,
                b"503 5.5.1 nested MAIL command\r\n",
            );
            return;
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            // BINARYMIME needs BDAT, which is not offered.
            self.refuse(
                out,
                Rejection::Unimplemented,
                b"504 5.5.4 BODY=BINARYMIME not supported\r\n",
            );
            return;
        }
        if from.flags & smtp_proto::MAIL_REQUIRETLS != 0 {
            // Not offered: we could not honour it downstream.
            self.refuse(
                out,
                Rejection::Syntax,
                b"555 5.5.4 unsupported parameter REQUIRETLS\r\n",
            );
            return;
        }
        if from.address.is_empty() && !empty {
            // A reverse-path is a full mailbox or <>; "postmaster" alone
            // must not turn into the null sender (which is never bounced).
            self.refuse(
                out,
                Rejection::BadAddress,
                b"501 5.1.7 bad sender address syntax\r\n",
            );
            return;
        }
        let (path, params) = split_path(line);
        let sender = if from.address.is_empty() {
            String::new()
        } else {
            match mailbox(path) {
                Some(address) => address,
                None => {
                    self.refuse(
                        out,
                        Rejection::BadAddress,
                        b"501 5.1.7 bad sender address syntax\r\n",
                    );
                    return;
                }
            }
        };
        let mut envid = None;
        let mut mt_priority = None;
        for (key, value) in parameters(params) {
            if key.eq_ignore_ascii_case(b"MT-PRIORITY") {
                if self.config.mt_priority.is_none() {
                    self.refuse(
                        out,
                        Rejection::Syntax,
                        b"555 5.5.4 unsupported parameter MT-PRIORITY\r\n",
                    );
                    return;
                }
                if mt_priority.is_some() {
                    self.refuse(
                        out,
                        Rejection::Syntax,
                        b"501 5.5.4 MT-PRIORITY given more than once\r\n",
                    );
                    return;
                }
                match crate::mt_priority::parse_value(value) {
                    // RFC 6710 allows it: an untrusted client's raise is lowered
                    // to the default, never refused.
                    Some(v) if v > 0 && !self.mt_priority_trusted() => mt_priority = Some(0),
                    Some(v) => mt_priority = Some(v),
                    None => {
                        self.refuse(
                            out,
                            Rejection::Syntax,
                            b"501 5.5.4 invalid MT-PRIORITY parameter, write -9 to 9\r\n",
                        );
                        return;
                    }
                }
            } else if key.eq_ignore_ascii_case(b"ENVID") {
                match xtext_decode(value) {
                    Some(v) => envid = Some(v),
                    None => {
                        self.refuse(
                            out,
                            Rejection::Syntax,
                            b"501 5.5.4 invalid ENVID parameter\r\n",
                        );
                        return;
                    }
                }
            }
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !smtputf8 && !sender.is_ascii() {
            self.refuse(
                out,
                Rejection::BadAddress,
                b"553 5.6.7 non-ASCII address requires SMTPUTF8\r\n",
            );
            return;
        }
        if from.size as u64 > self.config.max_message_size {
            self.refuse(
                out,
                Rejection::MessageTooLarge,
                b"552 5.3.4 message size exceeds fixed maximum\r\n",
            );
            return;
        }
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(Ret::Full)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(Ret::Headers)
        } else {
            None
        };
        self.mail = Some(MailState {
            sender,
            envid,
            ret,
            body_8bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
            smtputf8,
            mt_priority,
        });
        self.recipients.clear();
        push_reply(out, b"250 2.1.0 Ok\r\n");
    }

    /// `line`: the command as received. An empty address from smtp-proto
    /// is `<>` when the path was literally that, else `<postmaster>`.
    pub(super) fn rcpt_to(&mut self, to: RcptTo<Cow<'_, str>>, line: &[u8], out: &mut Vec<Output>) {
        let Some(mail) = &self.mail else {
            self.refuse(out, Rejection::Sequence, b"503 5.5.1 need MAIL command\r\n");
            return;
        };
        let smtputf8 = mail.smtputf8;
        let empty = empty_path(line);
        if to.address.is_empty() && !empty {
            // A relay has no local mailboxes, not even postmaster.
            self.refuse(
                out,
                Rejection::BadAddress,
                b"550 5.1.1 <postmaster>: no local mailboxes, relay only\r\n",
            );
            return;
        }
        let (path, params) = split_path(line);
        let address = match mailbox(path) {
            Some(address) if !to.address.is_empty() => address,
            _ => {
                self.refuse(
                    out,
                    Rejection::BadAddress,
                    b"501 5.1.3 bad recipient address syntax\r\n",
                );
                return;
            }
        };
        let mut orcpt = None;
        for (key, value) in parameters(params) {
            if key.eq_ignore_ascii_case(b"ORCPT") {
                let decoded = value
                    .iter()
                    .position(|&b| b == b';')
                    .and_then(|semi| xtext_decode(&value[semi + 1..]));
                match decoded {
                    Some(v) => orcpt = Some(format!("rfc822;{v}")),
                    None => {
                        self.refuse(
                            out,
                            Rejection::Syntax,
                            b"501 5.5.4 invalid ORCPT parameter\r\n",
                        );
                        return;
                    }
                }
            }
        }
        if !smtputf8 && !address.is_ascii() {
            self.refuse(
                out,
                Rejection::BadAddress,
                b"553 5.6.7 non-ASCII address requires SMTPUTF8\r\n",
            );
            return;
        }
        if !self.may_relay() {
            let reply = format!(
                "554 5.7.1 <{}>: relay access denied\r\n",
                printable(&address)
            );
            self.refuse(out, Rejection::RelayDenied, reply.as_bytes());
            return;
        }
        if self.recipients.len() >= self.config.max_recipients {
            self.refuse(
                out,
                Rejection::TooManyRecipients,
                b"452 4.5.3 too many recipients\r\n",
            );
            return;
        }
        let notify = to.flags
            & (smtp_proto::RCPT_NOTIFY_SUCCESS
                | smtp_proto::RCPT_NOTIFY_FAILURE
                | smtp_proto::RCPT_NOTIFY_DELAY
                | smtp_proto::RCPT_NOTIFY_NEVER);
        self.recipients.push(Recipient {
            address,
            orcpt,
            notify,
        });
        push_reply(out, b"250 2.1.5 Ok\r\n");
    }
}
