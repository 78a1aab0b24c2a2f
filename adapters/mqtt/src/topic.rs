//! Topics: `kalima/<address>/<key>` puts, `kalima/out/<address>/<key>` deliveries,
//! `kalima/errors/<device>` refusals, and MQTT filter matching.

/// Prefix of put topics.
pub const PREFIX: &str = "kalima/";
/// Prefix of delivery topics.
pub const OUT: &str = "kalima/out";
/// Prefix of error topics.
pub const ERRORS: &str = "kalima/errors/";

/// The address and key a put topic names (`kalima/plant-1/line-2/temp` -> `/plant-1/line-2`, `temp`).
pub fn parse_put(topic: &str) -> Result<(String, String), String> {
    let rest = topic
        .strip_prefix(PREFIX)
        .ok_or_else(|| format!("topic {topic:?} does not start with kalima/ (write to kalima/<address>/<key>)"))?;
    if rest.starts_with("out/") || rest.starts_with("errors/") || rest == "out" || rest == "errors" {
        return Err(format!("topic {topic:?} is reserved for the node's own messages"));
    }
    if rest.contains(['+', '#']) {
        return Err(format!("topic {topic:?} contains a wildcard"));
    }
    let (addr, key) = rest
        .rsplit_once('/')
        .ok_or_else(|| format!("topic {topic:?} needs an address and a key: kalima/<address>/<key>"))?;
    Ok((format!("/{addr}"), key.to_string()))
}

/// Where committed data of `address`/`key` is delivered.
pub fn out_topic(address: &str, key: &str) -> String {
    format!("{OUT}{address}/{key}")
}

/// Whether `filter` is a well-formed MQTT topic filter.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// MQTT topic matching (`+` one level, `#` this level and below).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            lit => {
                if t.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// What a subscription filter reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterKind {
    /// Committed data under `kalima/out/...`.
    Out,
    /// The device's own refusals.
    Errors,
}

/// Classifies a filter `device` asks for; `None` when it may not subscribe to it.
pub fn classify(filter: &str, device: &str) -> Option<FilterKind> {
    if !valid_filter(filter) {
        return None;
    }
    if filter == format!("{ERRORS}{device}") {
        return Some(FilterKind::Errors);
    }
    if filter == "kalima/out/#" || filter.starts_with("kalima/out/") || filter == "kalima/+/#" {
        return Some(FilterKind::Out);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_topics_follow_the_design() {
        assert_eq!(parse_put("kalima/plant-1/line-2/temp"), Ok(("/plant-1/line-2".into(), "temp".into())));
        assert_eq!(parse_put("kalima/a/k"), Ok(("/a".into(), "k".into())));
        for bad in ["kalima/k", "other/a/k", "kalima/out/a/k", "kalima/errors/x/y", "kalima/a/+", "kalima/#"] {
            assert!(parse_put(bad).is_err(), "{bad}");
        }
        assert_eq!(out_topic("/plant-1/line-2", "temp"), "kalima/out/plant-1/line-2/temp");
    }

    #[test]
    fn filters_match_like_mqtt() {
        let t = "kalima/out/plant-1/line-2/temp";
        for f in ["kalima/out/#", "kalima/out/plant-1/#", "kalima/out/+/line-2/temp", "kalima/+/#", "#", t] {
            assert!(matches(f, t), "{f}");
        }
        for f in [
            "kalima/out/plant-2/#",
            "kalima/out/+/temp",
            "kalima/out/plant-1/line-2",
            "kalima/out/plant-1/line-2/temp/x",
        ] {
            assert!(!matches(f, t), "{f}");
        }
        assert!(valid_filter("a/+/#") && !valid_filter("a/#/b") && !valid_filter("a/b+") && !valid_filter(""));
    }

    #[test]
    fn only_out_and_own_errors_can_be_followed() {
        assert_eq!(classify("kalima/out/#", "d"), Some(FilterKind::Out));
        assert_eq!(classify("kalima/errors/d", "d"), Some(FilterKind::Errors));
        assert_eq!(classify("kalima/errors/e", "d"), None);
        assert_eq!(classify("kalima/plant/#", "d"), None);
        assert_eq!(classify("#", "d"), None);
    }
}
