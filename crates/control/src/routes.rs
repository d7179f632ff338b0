//! The route table: every (method, path) the API serves and the role it needs. The router
//! dispatches from this table, and a test checks it against `docs/api/openapi.json`.

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The holder of `STATE_DIR/operator.token`.
    Operator,
    /// The holder of the VM's owner token.
    Owner,
    /// Either of them.
    OperatorOrOwner,
    /// Anyone who can reach the socket (its 0600 mode decides who that is).
    Public,
}

/// What a route does; the handler is chosen by this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    List,
    Describe,
    Delete,
    Start,
    Pause,
    Resume,
    Stop,
    Kill,
    Console,
    Exec,
    Ps,
    Introspect,
    CrossView,
    Snapshot,
    Restore,
    Metrics,
    Health,
    Progress,
}

#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    /// With `{name}` where the VM name goes.
    pub path: &'static str,
    pub action: Action,
    pub role: Role,
}

const fn r(method: &'static str, path: &'static str, action: Action, role: Role) -> Route {
    Route {
        method,
        path,
        action,
        role,
    }
}

/// Every route of the API.
pub const ROUTES: &[Route] = &[
    r("POST", "/v1/vms", Action::Create, Role::Operator),
    r("GET", "/v1/vms", Action::List, Role::Operator),
    r(
        "GET",
        "/v1/vms/{name}",
        Action::Describe,
        Role::OperatorOrOwner,
    ),
    r("DELETE", "/v1/vms/{name}", Action::Delete, Role::Operator),
    r(
        "POST",
        "/v1/vms/{name}/start",
        Action::Start,
        Role::Operator,
    ),
    r(
        "POST",
        "/v1/vms/{name}/pause",
        Action::Pause,
        Role::Operator,
    ),
    r(
        "POST",
        "/v1/vms/{name}/resume",
        Action::Resume,
        Role::Operator,
    ),
    r("POST", "/v1/vms/{name}/stop", Action::Stop, Role::Operator),
    r("POST", "/v1/vms/{name}/kill", Action::Kill, Role::Operator),
    r(
        "GET",
        "/v1/vms/{name}/console",
        Action::Console,
        Role::Owner,
    ),
    r("POST", "/v1/vms/{name}/exec", Action::Exec, Role::Owner),
    r("GET", "/v1/vms/{name}/ps", Action::Ps, Role::Owner),
    r(
        "POST",
        "/v1/vms/{name}/introspect",
        Action::Introspect,
        Role::Owner,
    ),
    r(
        "GET",
        "/v1/vms/{name}/crossview",
        Action::CrossView,
        Role::Owner,
    ),
    r(
        "POST",
        "/v1/vms/{name}/snapshot",
        Action::Snapshot,
        Role::Owner,
    ),
    r(
        "POST",
        "/v1/vms/{name}/restore",
        Action::Restore,
        Role::Owner,
    ),
    r("GET", "/metrics", Action::Metrics, Role::Operator),
    r("GET", "/v1/health", Action::Health, Role::Public),
    r(
        "GET",
        "/v1/vms/{name}/progress",
        Action::Progress,
        Role::OperatorOrOwner,
    ),
];

/// Matches a request path against a template; returns the `{name}` segment if any.
fn match_path<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut name = None;
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(name),
            (Some("{name}"), Some(seg)) if !seg.is_empty() => name = Some(seg),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// The outcome of routing a request.
#[derive(Debug)]
pub enum Routed<'a> {
    Found {
        route: &'static Route,
        name: Option<&'a str>,
    },
    /// The path exists with other methods.
    WrongMethod,
    NotFound,
}

/// Finds the route for a method and path.
pub fn route<'a>(method: &str, path: &'a str) -> Routed<'a> {
    let mut path_known = false;
    for rt in ROUTES {
        if let Some(name) = match_path(rt.path, path) {
            if rt.method == method {
                return Routed::Found { route: rt, name };
            }
            path_known = true;
        }
    }
    if path_known {
        Routed::WrongMethod
    } else {
        Routed::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_matches_templates_and_methods() {
        let Routed::Found { route: r, name } = route("POST", "/v1/vms/web-1/pause") else {
            panic!()
        };
        assert_eq!((r.action, name), (Action::Pause, Some("web-1")));
        let Routed::Found { route: r, name } = route("GET", "/v1/vms") else {
            panic!()
        };
        assert_eq!((r.action, name), (Action::List, None));
        assert!(matches!(route("PUT", "/v1/vms"), Routed::WrongMethod));
        assert!(matches!(route("GET", "/v1/vms//pause"), Routed::NotFound));
        assert!(matches!(route("GET", "/v2/vms"), Routed::NotFound));
        assert!(matches!(route("GET", "/v1/vms/a/b/c"), Routed::NotFound));
    }
}
