//! `poolrelay passwd USER`: prints a `USER:HASH` line for a listener's
//! `users_file`. The password is read from the terminal without echo
//! (asked twice), or as the first line of standard input when it is not a
//! terminal (for scripts: `printf '%s\n' "$PW" | poolrelay passwd alice`).

use std::io::{BufRead, IsTerminal, Write};

use poolrelay_smtp::inbound::{MAX_PASSWORD, MAX_USERNAME, username_acceptable};

/// Runs the subcommand; the error is for stderr.
pub fn run(user: &str) -> Result<(), String> {
    check_user(user)?;
    let password = if std::io::stdin().is_terminal() {
        let first = prompt("Password: ")?;
        let again = prompt("Again: ")?;
        if first != again {
            return Err("the passwords differ; nothing printed".into());
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    check_password(&password)?;
    let hash = poolrelay_config::hash_password(password.as_bytes())?;
    println!("{user}:{hash}");
    Ok(())
}

/// A user name that fits a users_file line and that AUTH can accept.
fn check_user(user: &str) -> Result<(), String> {
    if !username_acceptable(user) || user.chars().any(|c| c == ':' || c.is_whitespace()) {
        return Err(format!(
            "user name {user:?} cannot go in a users_file or be used with AUTH: \
             use 1 to {MAX_USERNAME} bytes, no colon, space or control character"
        ));
    }
    Ok(())
}

/// A password AUTH can accept.
fn check_password(password: &str) -> Result<(), String> {
    if password.is_empty() {
        return Err("the password is empty; nothing printed".into());
    }
    if password.len() > MAX_PASSWORD {
        return Err(format!(
            "the password is {} bytes; AUTH accepts at most {MAX_PASSWORD}; nothing printed",
            password.len()
        ));
    }
    Ok(())
}

/// Asks on stderr and reads a line from the terminal with echo off.
fn prompt(question: &str) -> Result<String, String> {
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let echo = Echo::off();
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    drop(echo);
    eprintln!();
    read.map_err(|e| format!("cannot read the password: {e}"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Terminal echo turned off until dropped.
struct Echo(Option<libc::termios>);

impl Echo {
    fn off() -> Echo {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Echo(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return Echo(None);
            }
            Echo(Some(saved))
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read in `off`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, saved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_auth_would_always_refuse() {
        assert!(check_user("alice@example.org").is_ok());
        assert!(check_user(&"u".repeat(MAX_USERNAME)).is_ok());
        let long = check_user(&"u".repeat(MAX_USERNAME + 1)).unwrap_err();
        assert!(long.contains("255 bytes"), "{long}");
        for bad in ["", "al:ice", "al ice", "al\u{7f}ice"] {
            assert!(check_user(bad).is_err(), "{bad:?}");
        }
        assert!(check_password("open sesame").is_ok());
        assert!(check_password(&"p".repeat(MAX_PASSWORD)).is_ok());
        let long = check_password(&"p".repeat(MAX_PASSWORD + 1)).unwrap_err();
        assert!(long.contains("at most 1024"), "{long}");
        assert!(check_password("").is_err());
    }
}
