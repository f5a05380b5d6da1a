//! Opening a session: TCP connect, greeting, EHLO (HELO as a fallback),
//! STARTTLS or implicit TLS, AUTH.

use super::types::{ClientError, ConnectOptions, Credentials, Timeouts, TlsMode, stage};
use super::wire::{Capabilities, Stream};
use crate::reply::Reply;
use crate::tls::TlsSetup;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// One open connection to an upstream.
pub struct Client {
    pub(super) io: BufReader<Box<dyn Stream>>,
    pub(super) peer: SocketAddr,
    pub(super) timeouts: Timeouts,
    pub(super) greeting: Reply,
    pub(super) caps: Capabilities,
    /// TLS negotiated here (implicit or STARTTLS).
    pub(super) tls: bool,
    /// False once an I/O error, timeout, 421 or protocol error happened:
    /// the SMTP state of the connection is then unknown.
    pub(super) usable: bool,
    /// An RSET asked for on a PIPELINING connection, not sent yet: it goes
    /// out in the same write as the next MAIL and RCPTs (RFC 2920 allows
    /// RSET in a group), saving a round trip per reused connection.
    pub(super) rset_pending: bool,
}
impl Client {
    /// Connects (TCP_NODELAY set), reads the greeting, sends EHLO (falling
    /// back to HELO), records the capabilities. Never TLS nor AUTH: the
    /// same as [`Client::connect_with`] with [`TlsMode::Off`].
    pub async fn connect(
        addr: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Client, ClientError> {
        let stream = tcp_connect(addr, timeouts.connect).await?;
        Client::handshake(stream, addr, helo_name, timeouts).await
    }

    /// Connects as [`Client::connect`] does, then applies `options.tls`
    /// (implicit TLS, or STARTTLS followed by a new EHLO whose
    /// capabilities replace the first ones) and, when `options.auth` is
    /// set, authenticates (PLAIN when offered, else LOGIN).
    ///
    /// Errors: [`ClientError::Tls`] when TLS was required or started but
    /// failed (nothing was sent in clear), [`ClientError::Auth`] when AUTH
    /// failed or could not be tried; both are reasons to defer, not to
    /// bounce. The connection is closed (QUIT when possible) on error.
    pub async fn connect_with(
        addr: SocketAddr,
        helo_name: &str,
        options: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        let t = options.timeouts;
        // Set up before connecting: a bad ca_file or name costs no connection.
        let setup = match options.tls {
            TlsMode::Off => None,
            // Opportunistic TLS authenticates nobody (RFC 7435): a
            // self-signed smarthost still gets encryption.
            TlsMode::Opportunistic => Some(TlsSetup::new(false, None, &options.server_name, addr)?),
            TlsMode::Required | TlsMode::Implicit => Some(TlsSetup::new(
                options.verify,
                options.ca_file.as_deref(),
                &options.server_name,
                addr,
            )?),
        };
        let stream = tcp_connect(addr, t.connect).await?;
        let mut client = match (&setup, options.tls) {
            (Some(setup), TlsMode::Implicit) => {
                let stream = setup.wrap(stream, t.greeting).await?;
                Client::open(Box::new(stream), addr, helo_name, t, true).await?
            }
            _ => Client::open(Box::new(stream), addr, helo_name, t, false).await?,
        };
        if let (Some(setup), TlsMode::Opportunistic | TlsMode::Required) = (&setup, options.tls) {
            client = client
                .starttls(setup, options.tls == TlsMode::Required, helo_name)
                .await?;
        }
        if let Some(credentials) = &options.auth
            && let Err(e) = client.authenticate(credentials).await
        {
            client.quit().await;
            return Err(e);
        }
        Ok(client)
    }

    /// Speaks SMTP over an already open stream (e.g. one wrapped in TLS):
    /// reads the greeting, sends EHLO/HELO. `peer` is only for reporting.
    /// [`Client::is_tls`] is false for it whatever the stream is.
    pub async fn handshake<S>(
        stream: S,
        peer: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Client::open(Box::new(stream), peer, helo_name, timeouts, false).await
    }

    /// Greeting and EHLO/HELO over `stream`.
    async fn open(
        stream: Box<dyn Stream>,
        peer: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
        tls: bool,
    ) -> Result<Client, ClientError> {
        if helo_name.is_empty()
            || helo_name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(ClientError::Io(format!("invalid HELO name {helo_name:?}")));
        }
        let mut client = Client {
            io: BufReader::new(stream),
            peer,
            timeouts,
            greeting: Reply {
                code: 0,
                enhanced: None,
                text: String::new(),
            },
            caps: Capabilities::default(),
            tls,
            usable: true,
            rset_pending: false,
        };
        let greeting = client
            .read_reply(stage::GREETING, timeouts.greeting)
            .await?;
        if !greeting.is_positive() {
            client.usable = false;
            return Err(ClientError::Rejected {
                stage: stage::GREETING,
                reply: greeting,
            });
        }
        client.greeting = greeting;
        client.hello(helo_name, true).await?;
        Ok(client)
    }

    /// EHLO, recording the capabilities; on a permanent refusal HELO when
    /// `helo_fallback` (then nothing is offered).
    async fn hello(&mut self, helo_name: &str, helo_fallback: bool) -> Result<(), ClientError> {
        let limit = self.timeouts.ehlo;
        self.caps = Capabilities::default();
        let ehlo = format!("EHLO {helo_name}\r\n");
        self.write(ehlo.as_bytes(), stage::EHLO, limit).await?;
        let mut raw = Vec::new();
        let reply = self
            .read_reply_keeping(stage::EHLO, limit, Some(&mut raw))
            .await?;
        if reply.is_positive() {
            self.caps = Capabilities::from_ehlo(&raw);
            return Ok(());
        }
        if !reply.is_permanent() || !helo_fallback {
            // 421, a temporary refusal or nonsense: HELO would fare no better.
            self.usable = false;
            return Err(ClientError::Rejected {
                stage: stage::EHLO,
                reply,
            });
        }
        let helo = format!("HELO {helo_name}\r\n");
        let reply = self.command(helo.as_bytes(), stage::HELO, limit).await?;
        if !reply.is_positive() {
            self.usable = false;
            return Err(ClientError::Rejected {
                stage: stage::HELO,
                reply,
            });
        }
        Ok(())
    }

    /// STARTTLS when offered, then EHLO again. Not offered or refused:
    /// `required` fails with [`ClientError::Tls`] (after QUIT), otherwise
    /// the session goes on in clear.
    async fn starttls(
        mut self,
        setup: &TlsSetup,
        required: bool,
        helo_name: &str,
    ) -> Result<Client, ClientError> {
        if !self.caps.starttls {
            if !required {
                return Ok(self);
            }
            let peer = self.peer;
            self.quit().await;
            return Err(ClientError::Tls(format!(
                "{peer} does not offer STARTTLS and TLS is required; nothing sent"
            )));
        }
        let limit = self.timeouts.ehlo;
        let reply = self
            .command(b"STARTTLS\r\n", stage::STARTTLS, limit)
            .await?;
        match reply.code {
            220 => {}
            421 => {
                return Err(ClientError::Rejected {
                    stage: stage::STARTTLS,
                    reply,
                });
            }
            // RFC 3207 §4: after a refusal the session goes on in clear.
            _ if (reply.is_transient() || reply.is_permanent()) && !required => {
                return Ok(self);
            }
            _ if reply.is_transient() || reply.is_permanent() => {
                self.quit().await;
                return Err(ClientError::Tls(format!(
                    "STARTTLS refused ({reply}) and TLS is required; nothing sent"
                )));
            }
            _ => {
                self.usable = false;
                return Err(ClientError::Tls(format!(
                    "unexpected reply to STARTTLS: {reply}"
                )));
            }
        }
        if !self.io.buffer().is_empty() {
            // Bytes sent after the 220 would be taken as if they had come
            // over TLS (the STARTTLS command injection of CVE-2011-0411).
            self.usable = false;
            return Err(ClientError::Tls(
                "upstream sent data after its 220 to STARTTLS".into(),
            ));
        }
        let stream = self.io.into_inner();
        let stream = setup.wrap(stream, self.timeouts.greeting).await?;
        self.io = BufReader::new(Box::new(stream));
        self.tls = true;
        // With TLS 1.3 a server that refuses us (a client certificate it
        // wanted, say) says so in an alert read after the handshake: a
        // broken connection before the first EHLO reply is a TLS failure.
        match self.hello(helo_name, false).await {
            Err(ClientError::Io(e)) => Err(ClientError::Tls(format!(
                "the session broke right after the handshake: {e}"
            ))),
            Err(e) => Err(e),
            Ok(()) => Ok(self),
        }
    }

    /// AUTH PLAIN (preferred) or LOGIN; 235 is success.
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<(), ClientError> {
        if !self.tls && !credentials.allow_plaintext {
            return Err(ClientError::Auth(
                "refusing to send the password in clear: the session is not encrypted \
                 (require TLS, or allow plaintext AUTH for this upstream)"
                    .into(),
            ));
        }
        if self.caps.auth.is_empty() {
            return Err(ClientError::Auth("upstream offers no AUTH".into()));
        }
        let Credentials {
            username, password, ..
        } = credentials;
        if username.contains('\0') || password.contains('\0') {
            return Err(ClientError::Auth(
                "the user name or password contains a NUL character".into(),
            ));
        }
        let limit = self.timeouts.ehlo;
        let offers = |mechanism: &str| self.caps.auth.iter().any(|m| m == mechanism);
        let (plain, login) = (offers("PLAIN"), offers("LOGIN"));
        let reply = if plain {
            let token = crate::base64::encode(format!("\0{username}\0{password}").as_bytes());
            let reply = self
                .command(
                    format!("AUTH PLAIN {token}\r\n").as_bytes(),
                    stage::AUTH,
                    limit,
                )
                .await?;
            if reply.code == 334 {
                // A server that ignored the initial response asks for it.
                self.command(format!("{token}\r\n").as_bytes(), stage::AUTH, limit)
                    .await?
            } else {
                reply
            }
        } else if login {
            let mut reply = self.command(b"AUTH LOGIN\r\n", stage::AUTH, limit).await?;
            for secret in [username, password] {
                if reply.code != 334 {
                    break;
                }
                let line = format!("{}\r\n", crate::base64::encode(secret.as_bytes()));
                reply = self.command(line.as_bytes(), stage::AUTH, limit).await?;
            }
            reply
        } else {
            return Err(ClientError::Auth(format!(
                "upstream offers AUTH {} but neither PLAIN nor LOGIN",
                self.caps.auth.join(" ")
            )));
        };
        match reply.code {
            235 => Ok(()),
            421 => Err(ClientError::Rejected {
                stage: stage::AUTH,
                reply,
            }),
            334 => {
                // More challenges than the mechanism has: cancel (RFC 4954).
                let _ = self.command(b"*\r\n", stage::AUTH, limit).await;
                Err(ClientError::Auth(format!("unexpected challenge {reply}")))
            }
            _ => Err(ClientError::Auth(reply.to_string())),
        }
    }

    /// Whether the session is encrypted (TLS negotiated by this client,
    /// implicit or STARTTLS), for logs.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether the upstream advertised PIPELINING.
    pub fn pipelining(&self) -> bool {
        self.caps.pipelining
    }

    /// Everything the upstream advertised.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The upstream's 220 greeting, for logs.
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// The address connected to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// False once the connection must not be reused: after an I/O error, a
    /// timeout, a 421, an unexpected reply or a refused RSET.
    pub fn is_usable(&self) -> bool {
        self.usable
    }
}

/// TCP connect within `limit`, TCP_NODELAY set.
async fn tcp_connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, ClientError> {
    let stream = match timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(ClientError::Timeout {
                stage: stage::CONNECT,
            });
        }
        Ok(Err(e)) => {
            return Err(ClientError::Connect {
                addr,
                reason: e.to_string(),
            });
        }
        Ok(Ok(stream)) => stream,
    };
    // Without it, small pipelined writes wait for delayed ACKs
    // (measured: ~22 msg/s per connection instead of >10k).
    stream.set_nodelay(true).map_err(|e| ClientError::Connect {
        addr,
        reason: format!("TCP_NODELAY: {e}"),
    })?;
    Ok(stream)
}

#[cfg(test)]
mod tests;
