//! The membership rules of groups, with no I/O: given the group's current state (from KV
//! `groups`) and a request, decide the new state and the event to record in the group's timeline,
//! or the error to answer. [`crate::service`] does the reading, the compare-and-set writes and the
//! publishing around it.

use std::collections::HashSet;

use protocol::groups::{GroupOp, GroupRequest, GroupState, MAX_NAME};
use protocol::{ErrorCode, GroupId, UserId};

/// Why a request was refused: the code and a human-readable message for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub msg: String,
}

impl OpError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        OpError { code, msg: msg.into() }
    }

    fn bad(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadField, msg)
    }

    fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "no such group")
    }

    fn not_member() -> Self {
        Self::new(ErrorCode::Forbidden, "not a member of the group")
    }

    fn not_admin() -> Self {
        Self::new(ErrorCode::Forbidden, "not an admin of the group")
    }
}

/// The kind of a membership change, as named in the timeline and in inbox items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Added,
    Removed,
    Left,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Added => "added",
            EventKind::Removed => "removed",
            EventKind::Left => "left",
        }
    }
}

/// A membership change to record in the group's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// Who made the change.
    pub by: String,
    /// The users it concerns: everyone in a new group, the added, the removed, the leaver.
    pub members: Vec<String>,
}

impl Event {
    /// Users who joined the group with this change.
    pub fn joined(&self) -> &[String] {
        match self.kind {
            EventKind::Created | EventKind::Added => &self.members,
            EventKind::Removed | EventKind::Left => &[],
        }
    }

    /// Users who are no longer members after this change.
    pub fn departed(&self) -> &[String] {
        match self.kind {
            EventKind::Created | EventKind::Added => &[],
            EventKind::Removed | EventKind::Left => &self.members,
        }
    }
}

/// The result of an accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The group changed: store `state`, then record `event`.
    Changed { state: GroupState, event: Event },
    /// The request asks for nothing new (adding members who are already in, removing users who
    /// are not): answer with the current state, write nothing.
    Unchanged(GroupState),
    /// A read (`info`): the group as it is.
    Read(GroupState),
}

/// What `create` needs from outside: the clock and a fresh group id.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub now_ms: u64,
    pub new_gid: &'a str,
    pub max_members: usize,
}

/// The group a request is about (`None` for `create` and `list`).
pub fn target(req: &GroupRequest) -> Option<&str> {
    match &req.op {
        GroupOp::Add { group, .. }
        | GroupOp::Remove { group, .. }
        | GroupOp::Leave { group }
        | GroupOp::Info { group } => Some(group),
        GroupOp::Create { .. } | GroupOp::List => None,
    }
}

/// The name of the operation, for metrics and logs.
pub fn op_name(op: &GroupOp) -> &'static str {
    match op {
        GroupOp::Create { .. } => "create",
        GroupOp::Add { .. } => "add",
        GroupOp::Remove { .. } => "remove",
        GroupOp::Leave { .. } => "leave",
        GroupOp::Info { .. } => "info",
        GroupOp::List => "list",
    }
}

/// Checks every identifier and the name of a request, so that nothing malformed reaches a KV key
/// or a subject. Everything else in this module assumes a validated request.
pub fn validate(req: &GroupRequest) -> Result<(), OpError> {
    UserId::parse(&req.by).map_err(|e| OpError::bad(format!("by: {e}")))?;
    if let Some(group) = target(req) {
        GroupId::parse(group).map_err(|e| OpError::bad(format!("group: {e}")))?;
    }
    let members = match &req.op {
        GroupOp::Create { name, members } => {
            validate_name(name)?;
            members
        }
        GroupOp::Add { members, .. } | GroupOp::Remove { members, .. } => {
            if members.is_empty() {
                return Err(OpError::bad("members: empty"));
            }
            members
        }
        _ => return Ok(()),
    };
    for m in members {
        UserId::parse(m).map_err(|e| OpError::bad(format!("members: {e}")))?;
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), OpError> {
    if name.trim().is_empty() {
        return Err(OpError::bad("name: empty"));
    }
    if name.len() > MAX_NAME {
        return Err(OpError::bad(format!("name: longer than {MAX_NAME} bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(OpError::bad("name: control characters"));
    }
    Ok(())
}

/// `list` in order, duplicates removed (first occurrence kept).
fn dedup(list: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    list.into_iter().filter(|m| seen.insert(m.clone())).collect()
}

/// Applies `req` to the group's current `state` (`None`: the group does not exist).
///
/// `list` is not a group operation and is refused here; [`crate::service`] answers it from the
/// `memberships` bucket.
pub fn apply(state: Option<&GroupState>, req: &GroupRequest, ctx: Ctx<'_>) -> Result<Outcome, OpError> {
    validate(req)?;
    let by = &req.by;
    match &req.op {
        GroupOp::Create { name, members } => {
            if state.is_some() {
                // A group id collision: the caller picks another id.
                return Err(OpError::new(ErrorCode::Internal, "group id already taken"));
            }
            let members = dedup(std::iter::once(by.clone()).chain(members.iter().cloned()));
            if members.len() > ctx.max_members {
                return Err(OpError::new(
                    ErrorCode::LimitExceeded,
                    format!("a group has at most {} members", ctx.max_members),
                ));
            }
            let state = GroupState {
                gid: ctx.new_gid.to_owned(),
                name: name.clone(),
                created_by: by.clone(),
                created_at: ctx.now_ms,
                admins: vec![by.clone()],
                members: members.clone(),
            };
            Ok(Outcome::Changed { state, event: Event { kind: EventKind::Created, by: by.clone(), members } })
        }
        GroupOp::Add { members, .. } => {
            let state = state.ok_or_else(OpError::not_found)?;
            if !state.is_member(by) {
                return Err(OpError::not_member());
            }
            if !state.is_admin(by) {
                return Err(OpError::not_admin());
            }
            let new: Vec<String> = dedup(members.iter().filter(|m| !state.is_member(m)).cloned());
            if new.is_empty() {
                return Ok(Outcome::Unchanged(state.clone()));
            }
            if state.members.len() + new.len() > ctx.max_members {
                return Err(OpError::new(
                    ErrorCode::LimitExceeded,
                    format!("a group has at most {} members", ctx.max_members),
                ));
            }
            let mut next = state.clone();
            next.members.extend(new.iter().cloned());
            Ok(Outcome::Changed { state: next, event: Event { kind: EventKind::Added, by: by.clone(), members: new } })
        }
        GroupOp::Remove { members, .. } => {
            let state = state.ok_or_else(OpError::not_found)?;
            if !state.is_member(by) {
                return Err(OpError::not_member());
            }
            let members = dedup(members.iter().cloned());
            // Removing yourself (alone) is leaving, which any member may do.
            let leaving = members.len() == 1 && &members[0] == by;
            if !leaving && !state.is_admin(by) {
                return Err(OpError::not_admin());
            }
            let removed: Vec<String> = members.into_iter().filter(|m| state.is_member(m)).collect();
            if removed.is_empty() {
                return Ok(Outcome::Unchanged(state.clone()));
            }
            let kind = if leaving { EventKind::Left } else { EventKind::Removed };
            Ok(Outcome::Changed {
                state: without(state, &removed),
                event: Event { kind, by: by.clone(), members: removed },
            })
        }
        GroupOp::Leave { .. } => {
            let state = state.ok_or_else(OpError::not_found)?;
            if !state.is_member(by) {
                return Err(OpError::not_member());
            }
            let removed = vec![by.clone()];
            Ok(Outcome::Changed {
                state: without(state, &removed),
                event: Event { kind: EventKind::Left, by: by.clone(), members: removed },
            })
        }
        GroupOp::Info { .. } => {
            let state = state.ok_or_else(OpError::not_found)?;
            if !state.is_member(by) {
                return Err(OpError::not_member());
            }
            Ok(Outcome::Read(state.clone()))
        }
        GroupOp::List => Err(OpError::bad("list is not a group operation")),
    }
}

/// `state` without `removed` (members and admins). If that leaves members but no admin, the
/// earliest remaining member (members are kept in join order) becomes admin.
fn without(state: &GroupState, removed: &[String]) -> GroupState {
    let mut next = state.clone();
    next.members.retain(|m| !removed.contains(m));
    next.admins.retain(|a| !removed.contains(a));
    if next.admins.is_empty() {
        if let Some(first) = next.members.first() {
            next.admins.push(first.clone());
        }
    }
    next
}

/// A user's group list (`memberships` value) with `gid` added; `None` if it is already there.
pub fn with_group(list: &[String], gid: &str) -> Option<Vec<String>> {
    if list.iter().any(|g| g == gid) {
        return None;
    }
    let mut next = list.to_vec();
    next.push(gid.to_owned());
    Some(next)
}

/// A user's group list with `gid` removed; `None` if it was not there.
pub fn without_group(list: &[String], gid: &str) -> Option<Vec<String>> {
    if !list.iter().any(|g| g == gid) {
        return None;
    }
    Some(list.iter().filter(|g| *g != gid).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4;

    fn ctx() -> Ctx<'static> {
        Ctx { now_ms: 77, new_gid: "gnew", max_members: MAX }
    }

    fn req(by: &str, op: GroupOp) -> GroupRequest {
        GroupRequest { by: by.into(), op }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn group(admins: &[&str], members: &[&str]) -> GroupState {
        GroupState {
            gid: "g1".into(),
            name: "friends".into(),
            created_by: "al".into(),
            created_at: 1,
            admins: s(admins),
            members: s(members),
        }
    }

    fn add(by: &str, m: &[&str]) -> GroupRequest {
        req(by, GroupOp::Add { group: "g1".into(), members: s(m) })
    }

    fn remove(by: &str, m: &[&str]) -> GroupRequest {
        req(by, GroupOp::Remove { group: "g1".into(), members: s(m) })
    }

    fn leave(by: &str) -> GroupRequest {
        req(by, GroupOp::Leave { group: "g1".into() })
    }

    fn info(by: &str) -> GroupRequest {
        req(by, GroupOp::Info { group: "g1".into() })
    }

    fn code(r: Result<Outcome, OpError>) -> ErrorCode {
        r.expect_err("refused").code
    }

    fn changed(r: Result<Outcome, OpError>) -> (GroupState, Event) {
        match r.expect("accepted") {
            Outcome::Changed { state, event } => (state, event),
            other => panic!("not a change: {other:?}"),
        }
    }

    #[test]
    fn create_includes_the_creator_once_and_makes_them_admin() {
        let r = req("al", GroupOp::Create { name: "friends".into(), members: s(&["bo", "al", "cy", "bo"]) });
        let (state, event) = changed(apply(None, &r, ctx()));
        assert_eq!(state.gid, "gnew");
        assert_eq!(state.name, "friends");
        assert_eq!(state.created_by, "al");
        assert_eq!(state.created_at, 77);
        assert_eq!(state.admins, s(&["al"]));
        assert_eq!(state.members, s(&["al", "bo", "cy"]));
        assert_eq!(event, Event { kind: EventKind::Created, by: "al".into(), members: s(&["al", "bo", "cy"]) });
        assert_eq!(event.joined(), &s(&["al", "bo", "cy"])[..]);
        assert!(event.departed().is_empty());
    }

    #[test]
    fn create_alone_is_fine() {
        let r = req("al", GroupOp::Create { name: "me".into(), members: vec![] });
        let (state, _) = changed(apply(None, &r, ctx()));
        assert_eq!(state.members, s(&["al"]));
    }

    #[test]
    fn create_enforces_the_cap_counting_the_creator() {
        let r = req("al", GroupOp::Create { name: "n".into(), members: s(&["a", "b", "c"]) });
        assert!(apply(None, &r, ctx()).is_ok());
        let r = req("al", GroupOp::Create { name: "n".into(), members: s(&["a", "b", "c", "d"]) });
        assert_eq!(code(apply(None, &r, ctx())), ErrorCode::LimitExceeded);
        // Duplicates do not count.
        let r = req("al", GroupOp::Create { name: "n".into(), members: s(&["a", "b", "c", "a", "al"]) });
        assert!(apply(None, &r, ctx()).is_ok());
    }

    #[test]
    fn create_over_an_existing_group_is_a_collision() {
        let r = req("al", GroupOp::Create { name: "n".into(), members: vec![] });
        assert_eq!(code(apply(Some(&group(&["al"], &["al"])), &r, ctx())), ErrorCode::Internal);
    }

    #[test]
    fn malformed_requests_are_bad_fields() {
        let bad = [
            req("a.b", GroupOp::List),
            req("", GroupOp::Info { group: "g1".into() }),
            req("al", GroupOp::Info { group: "g.1".into() }),
            req("al", GroupOp::Info { group: "".into() }),
            req("al", GroupOp::Leave { group: "g*".into() }),
            req("al", GroupOp::Create { name: "".into(), members: vec![] }),
            req("al", GroupOp::Create { name: "  ".into(), members: vec![] }),
            req("al", GroupOp::Create { name: "x".repeat(MAX_NAME + 1), members: vec![] }),
            req("al", GroupOp::Create { name: "a\nb".into(), members: vec![] }),
            req("al", GroupOp::Create { name: "n".into(), members: s(&["ok", "not ok"]) }),
            add("al", &[]),
            add("al", &["x>"]),
            remove("al", &[]),
            remove("al", &["a b"]),
        ];
        let g = group(&["al"], &["al", "bo"]);
        for r in bad {
            let got = apply(Some(&g), &r, ctx());
            assert_eq!(got.as_ref().map_err(|e| e.code), Err(ErrorCode::BadField), "{r:?}");
            assert_eq!(validate(&r).map_err(|e| e.code), Err(ErrorCode::BadField), "{r:?}");
        }
        assert!(validate(&req("al", GroupOp::Create { name: "x".repeat(MAX_NAME), members: vec![] })).is_ok());
        assert!(validate(&req("al", GroupOp::List)).is_ok());
    }

    #[test]
    fn list_is_not_applied_here() {
        assert_eq!(code(apply(None, &req("al", GroupOp::List), ctx())), ErrorCode::BadField);
    }

    #[test]
    fn add_requires_an_existing_group_and_an_admin_member() {
        let g = group(&["al"], &["al", "bo"]);
        assert_eq!(code(apply(None, &add("al", &["cy"]), ctx())), ErrorCode::NotFound);
        let e = apply(Some(&g), &add("zed", &["cy"]), ctx()).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (ErrorCode::Forbidden, "not a member of the group"));
        let e = apply(Some(&g), &add("bo", &["cy"]), ctx()).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (ErrorCode::Forbidden, "not an admin of the group"));
        let (state, event) = changed(apply(Some(&g), &add("al", &["cy", "bo", "cy", "dee"]), ctx()));
        assert_eq!(state.members, s(&["al", "bo", "cy", "dee"]));
        assert_eq!(state.admins, s(&["al"]));
        assert_eq!(event, Event { kind: EventKind::Added, by: "al".into(), members: s(&["cy", "dee"]) });
        assert_eq!(event.joined(), &s(&["cy", "dee"])[..]);
    }

    #[test]
    fn adding_existing_members_changes_nothing() {
        let g = group(&["al"], &["al", "bo"]);
        assert_eq!(apply(Some(&g), &add("al", &["bo", "al"]), ctx()), Ok(Outcome::Unchanged(g.clone())));
    }

    #[test]
    fn add_enforces_the_cap() {
        let g = group(&["al"], &["al", "bo", "cy"]);
        assert!(apply(Some(&g), &add("al", &["dee"]), ctx()).is_ok());
        assert_eq!(code(apply(Some(&g), &add("al", &["dee", "eve"]), ctx())), ErrorCode::LimitExceeded);
        // Existing members do not count against the cap.
        assert!(apply(Some(&g), &add("al", &["dee", "bo", "cy"]), ctx()).is_ok());
    }

    #[test]
    fn remove_requires_an_existing_group_and_an_admin_member() {
        let g = group(&["al"], &["al", "bo", "cy"]);
        assert_eq!(code(apply(None, &remove("al", &["bo"]), ctx())), ErrorCode::NotFound);
        assert_eq!(code(apply(Some(&g), &remove("zed", &["bo"]), ctx())), ErrorCode::Forbidden);
        assert_eq!(code(apply(Some(&g), &remove("bo", &["cy"]), ctx())), ErrorCode::Forbidden);
        // Removing yourself together with others is not leaving: admins only.
        assert_eq!(code(apply(Some(&g), &remove("bo", &["bo", "cy"]), ctx())), ErrorCode::Forbidden);
        let (state, event) = changed(apply(Some(&g), &remove("al", &["bo", "nobody", "bo"]), ctx()));
        assert_eq!(state.members, s(&["al", "cy"]));
        assert_eq!(event, Event { kind: EventKind::Removed, by: "al".into(), members: s(&["bo"]) });
        assert_eq!(event.departed(), &s(&["bo"])[..]);
        assert!(event.joined().is_empty());
    }

    #[test]
    fn removing_non_members_changes_nothing() {
        let g = group(&["al"], &["al", "bo"]);
        assert_eq!(apply(Some(&g), &remove("al", &["cy"]), ctx()), Ok(Outcome::Unchanged(g.clone())));
    }

    #[test]
    fn removing_yourself_is_leaving() {
        let g = group(&["al"], &["al", "bo", "cy"]);
        let (state, event) = changed(apply(Some(&g), &remove("bo", &["bo"]), ctx()));
        assert_eq!(state.members, s(&["al", "cy"]));
        assert_eq!(event, Event { kind: EventKind::Left, by: "bo".into(), members: s(&["bo"]) });
        // An admin removing themselves with others: the others and the admin go, admin passes on.
        let (state, event) = changed(apply(Some(&g), &remove("al", &["al", "bo"]), ctx()));
        assert_eq!(state.members, s(&["cy"]));
        assert_eq!(state.admins, s(&["cy"]));
        assert_eq!(event.kind, EventKind::Removed);
    }

    #[test]
    fn removing_an_admin_takes_their_admin_role() {
        let g = group(&["al", "bo"], &["al", "bo", "cy"]);
        let (state, _) = changed(apply(Some(&g), &remove("al", &["bo"]), ctx()));
        assert_eq!(state.admins, s(&["al"]));
    }

    #[test]
    fn leave_rules() {
        let g = group(&["al"], &["al", "bo", "cy"]);
        assert_eq!(code(apply(None, &leave("bo"), ctx())), ErrorCode::NotFound);
        assert_eq!(code(apply(Some(&g), &leave("zed"), ctx())), ErrorCode::Forbidden);
        let (state, event) = changed(apply(Some(&g), &leave("bo"), ctx()));
        assert_eq!((state.members, state.admins), (s(&["al", "cy"]), s(&["al"])));
        assert_eq!(event, Event { kind: EventKind::Left, by: "bo".into(), members: s(&["bo"]) });
    }

    #[test]
    fn last_admin_leaving_promotes_the_earliest_remaining_member() {
        let g = group(&["bo"], &["al", "bo", "cy"]);
        let (state, _) = changed(apply(Some(&g), &leave("bo"), ctx()));
        assert_eq!(state.members, s(&["al", "cy"]));
        assert_eq!(state.admins, s(&["al"]));
        // Another admin remains: nobody is promoted.
        let g = group(&["bo", "cy"], &["al", "bo", "cy"]);
        let (state, _) = changed(apply(Some(&g), &leave("bo"), ctx()));
        assert_eq!(state.admins, s(&["cy"]));
        // The last member leaves: an empty group, no admin.
        let g = group(&["al"], &["al"]);
        let (state, _) = changed(apply(Some(&g), &leave("al"), ctx()));
        assert!(state.members.is_empty() && state.admins.is_empty());
    }

    #[test]
    fn info_is_for_members_only() {
        let g = group(&["al"], &["al", "bo"]);
        assert_eq!(code(apply(None, &info("al"), ctx())), ErrorCode::NotFound);
        assert_eq!(code(apply(Some(&g), &info("zed"), ctx())), ErrorCode::Forbidden);
        assert_eq!(apply(Some(&g), &info("bo"), ctx()), Ok(Outcome::Read(g.clone())));
    }

    #[test]
    fn membership_lists() {
        let l = s(&["g1", "g2"]);
        assert_eq!(with_group(&l, "g2"), None);
        assert_eq!(with_group(&l, "g3"), Some(s(&["g1", "g2", "g3"])));
        assert_eq!(without_group(&l, "g3"), None);
        assert_eq!(without_group(&l, "g1"), Some(s(&["g2"])));
    }

    #[test]
    fn names() {
        assert_eq!(op_name(&GroupOp::List), "list");
        assert_eq!(op_name(&GroupOp::Leave { group: "g".into() }), "leave");
        assert_eq!(EventKind::Left.as_str(), "left");
        assert_eq!(target(&add("al", &["x"])), Some("g1"));
        assert_eq!(target(&req("al", GroupOp::List)), None);
    }
}
