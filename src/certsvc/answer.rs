//! Reading the certificate service's answers: the SOAP body, faults, `Result` with its
//! `ErrorInfo`, `RetrievalId` and `Certificate`. Callers verify the signature first.

use base64::Engine;
use roxmltree::{Document, Node};

use super::xml::{Operation, NS, SOAP_NS};

/// One `ErrorInfo` of a `Result`: shown to the user as the service wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// `ErrorCode`.
    pub code: String,
    /// `ErrorMessage`.
    pub message: String,
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// `Result`: `Status` plus any `ErrorInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceResult {
    /// `Status` was `OK`.
    pub ok: bool,
    /// The `Status` text as sent.
    pub status: String,
    /// The `ErrorInfo` entries, in order.
    pub errors: Vec<ErrorInfo>,
}

impl std::fmt::Display for ServiceResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Status {}", self.status)?;
        for e in &self.errors {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

/// What a response element says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `RetrievalId` (SignNew and Renew answers).
    pub retrieval_id: Option<String>,
    /// `Certificate`, decoded from base64 (Get answers).
    pub certificate: Option<Vec<u8>>,
    /// `Result`.
    pub result: ServiceResult,
}

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not XML.
    #[error("the answer is not XML: {0}")]
    NotXml(String),
    /// A SOAP fault instead of an answer.
    #[error("the certificate service answered with a SOAP fault: {code}: {message}")]
    Fault {
        /// `faultcode`.
        code: String,
        /// `faultstring`.
        message: String,
    },
    /// Not the shape the schema gives.
    #[error("the answer does not have the expected shape: {0}")]
    Shape(String),
}

/// Finds the single element in the SOAP body, or reads a fault.
pub fn body_element<'a, 'i>(doc: &'a Document<'i>) -> Result<Node<'a, 'i>, ParseError> {
    let env = doc.root_element();
    if !(env.tag_name().namespace() == Some(SOAP_NS) && env.tag_name().name() == "Envelope") {
        return Err(ParseError::Shape("no SOAP 1.1 Envelope".into()));
    }
    let body = child_elements(env)
        .find(|n| n.tag_name().namespace() == Some(SOAP_NS) && n.tag_name().name() == "Body")
        .ok_or_else(|| ParseError::Shape("no SOAP Body".into()))?;
    let mut items = child_elements(body);
    let first = items
        .next()
        .ok_or_else(|| ParseError::Shape("empty SOAP Body".into()))?;
    if items.next().is_some() {
        return Err(ParseError::Shape(
            "more than one element in the SOAP Body".into(),
        ));
    }
    if first.tag_name().namespace() == Some(SOAP_NS) && first.tag_name().name() == "Fault" {
        let text = |name: &str| {
            child_elements(first)
                .find(|n| n.tag_name().name() == name)
                .and_then(|n| n.text())
                .unwrap_or("")
                .trim()
                .to_string()
        };
        return Err(ParseError::Fault {
            code: text("faultcode"),
            message: text("faultstring"),
        });
    }
    Ok(first)
}

/// The element children of a node.
pub fn child_elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(|c| c.is_element())
}

/// The text of an element without element children (empty when it has none).
pub fn text_of(n: Node<'_, '_>) -> Result<String, ParseError> {
    if child_elements(n).next().is_some() {
        return Err(ParseError::Shape(format!(
            "{} holds elements, not text",
            n.tag_name().name()
        )));
    }
    // Text nodes only: roxmltree's text() also returns a comment's content, and comments are
    // not signed (exclusive c14n without comments drops them), so reading one would let an
    // unsigned comment change a signed value.
    Ok(n.children()
        .filter(|c| c.is_text())
        .filter_map(|c| c.text())
        .collect::<String>())
}

/// Reads a response element of `op` (whose signature the caller has already verified).
pub fn read_answer(el: Node<'_, '_>, op: Operation) -> Result<Answer, ParseError> {
    if el.tag_name().namespace() != Some(NS) || el.tag_name().name() != op.response_element() {
        return Err(ParseError::Shape(format!(
            "expected {{{NS}}}{}, got {{{}}}{}",
            op.response_element(),
            el.tag_name().namespace().unwrap_or(""),
            el.tag_name().name()
        )));
    }
    let mut answer = Answer {
        retrieval_id: None,
        certificate: None,
        result: ServiceResult {
            ok: false,
            status: String::new(),
            errors: Vec::new(),
        },
    };
    let mut saw_result = false;
    for c in child_elements(el) {
        if c.tag_name().namespace() == Some(super::dsig::DS_NS) {
            continue;
        }
        match c.tag_name().name() {
            "RetrievalId" if op != Operation::Get => {
                answer.retrieval_id = Some(text_of(c)?.trim().to_string())
            }
            "Certificate" if op == Operation::Get => {
                let t: String = text_of(c)?
                    .chars()
                    .filter(|c| !c.is_ascii_whitespace())
                    .collect();
                let der = base64::engine::general_purpose::STANDARD
                    .decode(t.as_bytes())
                    .map_err(|e| ParseError::Shape(format!("Certificate is not base64: {e}")))?;
                answer.certificate = Some(der);
            }
            "Result" => {
                saw_result = true;
                answer.result = read_result(c)?;
            }
            other => {
                return Err(ParseError::Shape(format!(
                    "unexpected element {other} in {}",
                    op.response_element()
                )))
            }
        }
    }
    if !saw_result {
        return Err(ParseError::Shape(format!(
            "{} has no Result",
            op.response_element()
        )));
    }
    Ok(answer)
}

fn read_result(r: Node<'_, '_>) -> Result<ServiceResult, ParseError> {
    let mut status = None;
    let mut errors = Vec::new();
    for c in child_elements(r) {
        match c.tag_name().name() {
            "Status" => status = Some(text_of(c)?.trim().to_string()),
            "ErrorInfo" => {
                let mut code = String::new();
                let mut message = String::new();
                for f in child_elements(c) {
                    match f.tag_name().name() {
                        "ErrorCode" => code = text_of(f)?.trim().to_string(),
                        "ErrorMessage" => message = text_of(f)?.trim().to_string(),
                        _ => {}
                    }
                }
                errors.push(ErrorInfo { code, message });
            }
            other => {
                return Err(ParseError::Shape(format!(
                    "unexpected element {other} in Result"
                )))
            }
        }
    }
    let status = status.ok_or_else(|| ParseError::Shape("Result has no Status".into()))?;
    Ok(ServiceResult {
        ok: status == "OK",
        status,
        errors,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::certsvc::xml::{envelope, fault, response_unsigned};

    #[test]
    fn reads_error_info_verbatim() {
        let el = response_unsigned(
            Operation::SignNew,
            None,
            None,
            &[ErrorInfo {
                code: "ERR_PWD".into(),
                message: "Väärä salasana & <tunnus>".into(),
            }],
        );
        let xml = envelope(&el);
        let doc = Document::parse(&xml).unwrap();
        let a = read_answer(body_element(&doc).unwrap(), Operation::SignNew).unwrap();
        assert!(!a.result.ok);
        assert_eq!(a.result.errors[0].message, "Väärä salasana & <tunnus>");
        assert_eq!(
            a.result.to_string(),
            "Status FAIL; ERR_PWD: Väärä salasana & <tunnus>"
        );
    }

    #[test]
    fn reads_certificate_and_retrieval_id() {
        let xml = envelope(&response_unsigned(Operation::Get, None, Some(b"DER"), &[]));
        let doc = Document::parse(&xml).unwrap();
        let a = read_answer(body_element(&doc).unwrap(), Operation::Get).unwrap();
        assert!(a.result.ok);
        assert_eq!(a.certificate.as_deref(), Some(&b"DER"[..]));
        let xml = envelope(&response_unsigned(Operation::Renew, Some("abc"), None, &[]));
        let doc = Document::parse(&xml).unwrap();
        assert!(read_answer(body_element(&doc).unwrap(), Operation::SignNew).is_err());
        let a = read_answer(body_element(&doc).unwrap(), Operation::Renew).unwrap();
        assert_eq!(a.retrieval_id.as_deref(), Some("abc"));
    }

    #[test]
    fn comments_do_not_change_values() {
        let xml = envelope(&response_unsigned(Operation::Renew, Some("ab"), None, &[]))
            .replace("<RetrievalId>ab", "<RetrievalId><!--evil-->a<!--x-->b");
        let doc = Document::parse(&xml).unwrap();
        let a = read_answer(body_element(&doc).unwrap(), Operation::Renew).unwrap();
        assert_eq!(a.retrieval_id.as_deref(), Some("ab"));
    }

    #[test]
    fn reads_fault() {
        let xml = fault("Server", "Internal & error");
        let doc = Document::parse(&xml).unwrap();
        assert_eq!(
            body_element(&doc).unwrap_err(),
            ParseError::Fault {
                code: "soapenv:Server".into(),
                message: "Internal & error".into()
            }
        );
    }
}
