//! The small web client (gateway/web/), compiled into the binary and served in dev mode only, so
//! that a person can try the system in a browser in a minute.

/// The content type and bytes of a web client asset, if `path` names one.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", include_bytes!("../web/index.html"))),
        "/app.js" => Some(("text/javascript; charset=utf-8", include_bytes!("../web/app.js"))),
        "/app.css" => Some(("text/css; charset=utf-8", include_bytes!("../web/app.css"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn serves_the_client_and_nothing_else() {
        assert!(super::asset("/").is_some());
        assert!(super::asset("/app.js").is_some());
        assert!(super::asset("/../Cargo.toml").is_none());
    }
}
