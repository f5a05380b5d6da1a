//! The `[[route]]`s that recognise LISTSERV's choice of pool in the mail.

use super::Origin;
use super::list::List;
use super::render::c;
use super::site::Site;
use crate::DEFAULT_POOL;

/// A `[[route]]` to write.
pub(super) struct RouteOut {
    pub(super) comment: Vec<String>,
    pub(super) pool: String,
    pub(super) sender: String,
    /// The `Sender:` header glob of a posting route.
    pub(super) header: Option<String>,
}

/// The routes, in the order that gives LISTSERV's semantics under first-match-wins.
pub(super) fn build_routes(
    site: &Site,
    lists: &[List],
    list_pools: &[Option<(String, String)>],
    at: &dyn Fn(&Origin) -> String,
) -> Vec<RouteOut> {
    let dash = DEFAULT_POOL.to_string();
    let domains: Vec<String> = site
        .domains
        .as_ref()
        .map_or_else(|| vec!["*".to_string()], |(hosts, _)| hosts.clone());
    let mut out = vec![RouteOut {
        comment: vec![
            "The null sender <>: bounces, and replies LISTSERV sends without a return path,"
                .to_string(),
            "always go to the default pool \"-\".".to_string(),
        ],
        pool: dash.clone(),
        sender: String::new(),
        header: None,
    }];
    for (i, host) in domains.iter().enumerate() {
        let comment = if i > 0 {
            Vec::new()
        } else {
            let whence = match &site.domains {
                Some((_, origin)) => format!("one route per MYDOMAIN host, {}", at(origin)),
                None => "no MYDOMAIN in site.cfg, so any host".to_string(),
            };
            vec![
                "Command replies and posting rejections come from LISTSERV@ and always go to the"
                    .to_string(),
                format!("default pool \"-\" ({whence})."),
            ]
        };
        out.push(RouteOut {
            comment,
            pool: dash.clone(),
            sender: format!("listserv@{host}"),
            header: None,
        });
    }
    for (l, pools) in lists.iter().zip(list_pools) {
        let Some((x, y)) = pools else { continue };
        let local = l
            .address
            .as_ref()
            .and_then(|(local, _, _)| local.clone())
            .unwrap_or_else(|| l.name.to_ascii_lowercase());
        let (hosts, whence) = match (&l.address, &site.domains) {
            (Some((_, host, line)), _) => (
                vec![host.clone()],
                format!("Host: its List-Address ({}:{line}).", l.file),
            ),
            (None, Some((hosts, _))) => (
                hosts.clone(),
                "Hosts: each MYDOMAIN host (no List-Address).".to_string(),
            ),
            (None, None) => (
                vec!["*".to_string()],
                "Host: any (no List-Address, no MYDOMAIN).".to_string(),
            ),
        };
        let why = match (&l.delivery, &site.list_pool) {
            (Some((_, _, line)), _) if x == y => {
                format!("Delivery-Pool= {x} ({}:{line})", l.file)
            }
            (Some((_, _, line)), _) => format!("Delivery-Pool= {x},{y} ({}:{line})", l.file),
            (None, Some(lp)) => format!(
                "no Delivery-Pool, so {}  ({})",
                c(&lp.origin.text),
                at(&lp.origin)
            ),
            (None, None) => String::new(),
        };
        for (i, host) in hosts.iter().enumerate() {
            let sender = format!("owner-{local}@{host}");
            let first = i == 0;
            if x == y {
                let mut comment = Vec::new();
                if first {
                    comment.push(format!("List {}: {why}. {whence}", l.name));
                    comment.push(format!(
                        "Postings and administrative mail both come from owner-{local}@: pool {x}."
                    ));
                }
                out.push(RouteOut {
                    comment,
                    pool: x.clone(),
                    sender,
                    header: None,
                });
                continue;
            }
            // Anchored globs: `Sender: LIST@host` or `Sender: Name <LIST@host>`,
            // never `owner-LIST@host` (which must stay administrative mail).
            let address = format!("{local}@{host}");
            let mut comment = Vec::new();
            if first {
                comment.push(format!("List {}: {why}. {whence}", l.name));
                comment.push(format!(
                    "Postings come from owner-{local}@ with a Sender: header naming {local}@: pool {x}."
                ));
                comment.push(
                    "Two routes: a bare Sender: address, then one with a display name.".to_string(),
                );
            } else {
                comment.push(format!("List {}, postings via {host}: pool {x}.", l.name));
            }
            out.push(RouteOut {
                comment,
                pool: x.clone(),
                sender: sender.clone(),
                header: Some(address.clone()),
            });
            out.push(RouteOut {
                comment: Vec::new(),
                pool: x.clone(),
                sender: sender.clone(),
                header: Some(format!("*<{address}>")),
            });
            out.push(RouteOut {
                comment: vec![
                    format!(
                        "Other mail from owner-{local}@{host} is the list's administrative mail (welcome"
                    ),
                    format!("messages, error reports, bounces it processed): pool {y}."),
                ],
                pool: y.clone(),
                sender,
                header: None,
            });
        }
    }
    out
}
