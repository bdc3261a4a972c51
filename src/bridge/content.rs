//! One content-type table for the three protocols (DESIGN §6): CoAP Content-Format numbers on
//! one side, HTTP Content-Type and MQTT 5 content type on the other.

/// Content-Format number and the media type it stands for.
const TABLE: &[(u16, &str)] = &[
    (0, "text/plain;charset=utf-8"),
    (40, "application/link-format"),
    (41, "application/xml"),
    (42, "application/octet-stream"),
    (47, "application/exi"),
    (50, "application/json"),
    (60, "application/cbor"),
    (110, "application/senml+json"),
    (112, "application/senml+cbor"),
];

/// The content type of a CoAP Content-Format, if the table has it.
pub fn content_type_for(format: u16) -> Option<&'static str> {
    TABLE.iter().find(|(n, _)| *n == format).map(|(_, t)| *t)
}

/// The CoAP Content-Format of a content type, if the table has it. Parameters other than a
/// `charset` are ignored; `text/plain` matches only without a charset or with UTF-8.
pub fn content_format_for(content_type: &str) -> Option<u16> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "text/plain" {
        let charset_ok = parts.all(|param| {
            let Some((name, value)) = param.split_once('=') else {
                return true;
            };
            !name.trim().eq_ignore_ascii_case("charset")
                || value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        });
        return charset_ok.then_some(0);
    }
    TABLE
        .iter()
        .skip(1)
        .find(|(_, t)| *t == essence)
        .map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips() {
        for (n, t) in TABLE {
            assert_eq!(content_type_for(*n), Some(*t));
            assert_eq!(content_format_for(t), Some(*n), "{t}");
        }
        assert_eq!(content_type_for(11542), None);
    }

    #[test]
    fn parameters_and_case_are_tolerated() {
        assert_eq!(content_format_for("text/plain"), Some(0));
        assert_eq!(content_format_for("Text/Plain; charset=\"UTF-8\""), Some(0));
        assert_eq!(content_format_for("text/plain; charset=iso-8859-1"), None);
        assert_eq!(
            content_format_for("application/json; charset=utf-8"),
            Some(50)
        );
        assert_eq!(content_format_for("APPLICATION/CBOR"), Some(60));
        assert_eq!(content_format_for("application/vnd.example+json"), None);
        assert_eq!(content_format_for(""), None);
    }
}
