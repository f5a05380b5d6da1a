//! DATA framing, strict: the message ends only at CRLF.CRLF, and a bare CR
//! or bare LF anywhere in the content is an error (SMTP smuggling defence).
