//! The publish and listing parameters HTTP query strings and CoAP Uri-Query options share, parsed
//! the same way for both.

use std::time::Duration;

use super::message::{Message, Qos};

/// A parameter value that cannot be used, with one sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

/// `true`/`1` or `false`/`0`.
pub fn parse_flag(name: &str, value: &str) -> Result<bool, ParamError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ParamError(format!("{name} must be true or false"))),
    }
}

/// An MQTT QoS level, `0`, `1` or `2`.
pub fn parse_qos(value: &str) -> Result<Qos, ParamError> {
    value
        .parse::<u8>()
        .ok()
        .and_then(Qos::new)
        .ok_or_else(|| ParamError("qos must be 0, 1 or 2".to_owned()))
}

/// A message expiry in seconds, 1 to 2^32-1, applied to `message`.
pub fn apply_expiry(message: &mut Message, value: &str) -> Result<(), ParamError> {
    let secs = value
        .parse::<u32>()
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| {
            ParamError("expiry must be a number of seconds from 1 to 4294967295".to_owned())
        })?;
    message.expires_at = Some(message.updated_at + Duration::from_secs(u64::from(secs)));
    Ok(())
}

/// A listing page size from 1 to `max`.
pub fn parse_limit(value: &str, max: usize) -> Result<usize, ParamError> {
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ParamError(format!(
            "limit must be a whole number from 1 to {max}"
        ))),
    }
}

/// The wait of a request/response call: a number of seconds (`2.5`) or a duration with a
/// unit (`500ms`, `5s`, `1m`), above zero and at most `max`. Longer is refused, not shortened:
/// a caller that asked for a minute would otherwise take a 504 for the gateway's word.
pub fn parse_timeout(value: &str, max: Duration) -> Result<Duration, ParamError> {
    let wait = match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= max.as_secs_f64() => {
            Some(Duration::from_secs_f64(secs))
        }
        Ok(_) => None,
        Err(_) => humantime::parse_duration(value).ok(),
    };
    match wait {
        Some(wait) if !wait.is_zero() && wait <= max => Ok(wait),
        _ => Err(ParamError(format!(
            "timeout must be above 0 and at most {} (seconds, or with a unit: 500ms, 5s)",
            humantime::format_duration(max)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_strict() {
        assert_eq!(parse_flag("retain", "1"), Ok(true));
        assert!(parse_flag("retain", "yes").is_err());
        assert_eq!(parse_qos("2").map(Qos::level), Ok(2));
        assert!(parse_qos("3").is_err());
        assert!(parse_qos("-1").is_err());
        assert_eq!(parse_limit("5", 10), Ok(5));
        assert!(parse_limit("0", 10).is_err());
        assert!(parse_limit("11", 10).is_err());
        let max = Duration::from_secs(60);
        assert_eq!(parse_timeout("2.5", max), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_timeout("500ms", max), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("1m", max), Ok(max));
        for bad in ["0", "0s", "61", "2m", "-1", "NaN", "inf", "soon", ""] {
            assert!(parse_timeout(bad, max).is_err(), "{bad}");
        }
    }
}
