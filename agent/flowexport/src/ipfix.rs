//! IPFIX messages (RFC 7011), written by hand: no well-kept Rust crate
//! writes them without generating code from the whole IANA registry at
//! build time. What is here is the message format only: a header, template
//! sets and data sets, with enterprise-specific information elements and
//! variable-length fields. What goes in the records is [`crate::record`]'s.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The IPFIX version number.
pub const VERSION: u16 = 10;
/// The set id of a template set.
pub const TEMPLATE_SET: u16 = 2;
/// A message header's length.
pub const HEADER_LEN: usize = 16;
/// A set header's length.
const SET_HEADER_LEN: usize = 4;
/// The field length of a variable-length information element.
pub const VARLEN: u16 = 65535;
/// The longest message: its length is 16 bits.
pub const MESSAGE_MAX: usize = 65535;

/// One field of a template: an information element, IANA's (`pen`
/// `None`) or an enterprise's, and its length in a data record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub id: u16,
    pub pen: Option<u32>,
    pub len: u16,
}

impl Field {
    pub const fn iana(id: u16, len: u16) -> Field {
        Field { id, pen: None, len }
    }

    pub const fn enterprise(pen: u32, id: u16, len: u16) -> Field {
        Field {
            id,
            pen: Some(pen),
            len,
        }
    }
}

/// A template: its id (256 or above) and its fields, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub id: u16,
    pub fields: Vec<Field>,
}

impl Template {
    fn encoded_len(&self) -> usize {
        4 + self
            .fields
            .iter()
            .map(|f| if f.pen.is_some() { 8 } else { 4 })
            .sum::<usize>()
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&(self.fields.len() as u16).to_be_bytes());
        for f in &self.fields {
            match f.pen {
                Some(pen) => {
                    out.extend_from_slice(&(f.id | 0x8000).to_be_bytes());
                    out.extend_from_slice(&f.len.to_be_bytes());
                    out.extend_from_slice(&pen.to_be_bytes());
                }
                None => {
                    out.extend_from_slice(&f.id.to_be_bytes());
                    out.extend_from_slice(&f.len.to_be_bytes());
                }
            }
        }
    }
}

/// The value of one field of a data record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// Of a variable-length field ([`VARLEN`]).
    Str(&'a str),
}

/// Why a record could not be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("template {template}: {values} values for {fields} fields")]
    Arity {
        template: u16,
        values: usize,
        fields: usize,
    },
    #[error("template {template}, field {index} (element {id}): a value of {got} for a field of length {len}")]
    Mismatch {
        template: u16,
        index: usize,
        id: u16,
        got: &'static str,
        len: u16,
    },
    #[error("a record of {0} bytes does not fit in a message")]
    TooLarge(usize),
}

impl Value<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Value::U8(_) => "1 byte",
            Value::U16(_) => "2 bytes",
            Value::U32(_) => "4 bytes",
            Value::U64(_) => "8 bytes",
            Value::V4(_) => "an IPv4 address",
            Value::V6(_) => "an IPv6 address",
            Value::Str(_) => "a string",
        }
    }

    /// Its encoding in a field of length `len`; `None` if it does not
    /// belong there.
    fn write(&self, len: u16, out: &mut Vec<u8>) -> Option<()> {
        match (self, len) {
            (Value::U8(v), 1) => out.push(*v),
            (Value::U16(v), 2) => out.extend_from_slice(&v.to_be_bytes()),
            (Value::U32(v), 4) => out.extend_from_slice(&v.to_be_bytes()),
            (Value::U64(v), 8) => out.extend_from_slice(&v.to_be_bytes()),
            (Value::V4(a), 4) => out.extend_from_slice(&a.octets()),
            (Value::V6(a), 16) => out.extend_from_slice(&a.octets()),
            (Value::Str(s), VARLEN) => {
                // RFC 7011 7: one length byte below 255, else 255 and two.
                let mut end = s.len().min(usize::from(u16::MAX) - 3);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                let b = &s.as_bytes()[..end];
                if b.len() < 255 {
                    out.push(b.len() as u8);
                } else {
                    out.push(255);
                    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
                }
                out.extend_from_slice(b);
            }
            _ => return None,
        }
        Some(())
    }
}

/// One message being built: templates and records go in until it is full.
pub struct Message {
    buf: Vec<u8>,
    max: usize,
    /// The open set: where its header is, and its id.
    set: Option<(usize, u16)>,
    records: u32,
}

impl Message {
    /// A message of at most `max` bytes (for UDP, what fits the path's MTU).
    pub fn new(max: usize) -> Message {
        let mut buf = Vec::with_capacity(max.min(MESSAGE_MAX));
        buf.resize(HEADER_LEN, 0);
        Message {
            buf,
            max: max.clamp(HEADER_LEN + 64, MESSAGE_MAX),
            set: None,
            records: 0,
        }
    }

    /// Data records in it.
    pub fn records(&self) -> u32 {
        self.records
    }

    /// Whether anything was put in.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == HEADER_LEN
    }

    fn close_set(&mut self) {
        if let Some((at, _)) = self.set.take() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at + 2..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    fn open_set(&mut self, id: u16) {
        if self.set.map(|(_, s)| s) == Some(id) {
            return;
        }
        self.close_set();
        self.set = Some((self.buf.len(), id));
        self.buf.extend_from_slice(&id.to_be_bytes());
        self.buf.extend_from_slice(&[0, 0]);
    }

    /// Puts `templates` in, in one template set; `false` if they do not fit.
    pub fn add_templates(&mut self, templates: &[Template]) -> bool {
        let need = SET_HEADER_LEN + templates.iter().map(Template::encoded_len).sum::<usize>();
        if self.buf.len() + need > self.max {
            return false;
        }
        self.close_set();
        self.open_set(TEMPLATE_SET);
        for t in templates {
            t.write(&mut self.buf);
        }
        self.close_set();
        true
    }

    /// Puts one data record of `template` in: `Ok(false)` if the message
    /// has no room left for it (nothing is written), an error if the
    /// values do not fit the template or the record no message.
    pub fn add_record(&mut self, template: &Template, values: &[Value]) -> Result<bool, EncodeError> {
        if values.len() != template.fields.len() {
            return Err(EncodeError::Arity {
                template: template.id,
                values: values.len(),
                fields: template.fields.len(),
            });
        }
        let mut rec = Vec::with_capacity(64);
        for (index, (f, v)) in template.fields.iter().zip(values).enumerate() {
            v.write(f.len, &mut rec).ok_or(EncodeError::Mismatch {
                template: template.id,
                index,
                id: f.id,
                got: v.kind(),
                len: f.len,
            })?;
        }
        let set_header = if self.set.map(|(_, s)| s) == Some(template.id) {
            0
        } else {
            SET_HEADER_LEN
        };
        if HEADER_LEN + SET_HEADER_LEN + rec.len() > self.max {
            return Err(EncodeError::TooLarge(rec.len()));
        }
        if self.buf.len() + set_header + rec.len() > self.max {
            return Ok(false);
        }
        self.open_set(template.id);
        self.buf.extend_from_slice(&rec);
        self.records += 1;
        Ok(true)
    }

    /// The message's bytes, with its header: the export time (Unix
    /// seconds), the sequence number (data records sent before this
    /// message in this session) and the observation domain.
    pub fn finish(mut self, export_time: u32, sequence: u32, domain: u32) -> Vec<u8> {
        self.close_set();
        let len = self.buf.len() as u16;
        let h = &mut self.buf[..HEADER_LEN];
        h[0..2].copy_from_slice(&VERSION.to_be_bytes());
        h[2..4].copy_from_slice(&len.to_be_bytes());
        h[4..8].copy_from_slice(&export_time.to_be_bytes());
        h[8..12].copy_from_slice(&sequence.to_be_bytes());
        h[12..16].copy_from_slice(&domain.to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            id: 256,
            fields: vec![
                Field::iana(8, 4),
                Field::iana(7, 2),
                Field::iana(1, 8),
                Field::enterprise(32473, 1, VARLEN),
            ],
        }
    }

    /// The bytes RFC 7011 says, field by field.
    #[test]
    fn a_message_is_laid_out_as_the_rfc_says() {
        let t = template();
        let mut m = Message::new(1400);
        assert!(m.add_templates(std::slice::from_ref(&t)));
        let values = [
            Value::V4(Ipv4Addr::new(10, 0, 0, 1)),
            Value::U16(443),
            Value::U64(1500),
            Value::Str("acme"),
        ];
        assert!(m.add_record(&t, &values).unwrap());
        assert!(m.add_record(&t, &values).unwrap());
        assert_eq!(m.records(), 2);
        let b = m.finish(1_764_979_200, 7, 42);
        let template_set = [
            0, 2, 0, 28, // set 2, 28 bytes
            1, 0, 0, 4, // template 256, 4 fields
            0, 8, 0, 4, 0, 7, 0, 2, 0, 1, 0, 8, // 8/4, 7/2, 1/8
            0x80, 1, 0xff, 0xff, 0, 0, 0x7e, 0xd9, // enterprise 1, variable, PEN 32473
        ];
        let record = [10, 0, 0, 1, 1, 187, 0, 0, 0, 0, 0, 0, 5, 220, 4, b'a', b'c', b'm', b'e'];
        let mut want = vec![0, 10, 0, 0, 0x69, 0x33, 0x72, 0x00, 0, 0, 0, 7, 0, 0, 0, 42];
        want.extend_from_slice(&template_set);
        want.extend_from_slice(&[1, 0, 0, 4 + 2 * record.len() as u8]);
        want.extend_from_slice(&record);
        want.extend_from_slice(&record);
        let len = want.len() as u16;
        want[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(b, want);
    }

    #[test]
    fn long_strings_take_three_length_bytes() {
        let t = Template {
            id: 300,
            fields: vec![Field::iana(82, VARLEN)],
        };
        let mut m = Message::new(2000);
        let s = "x".repeat(300);
        assert!(m.add_record(&t, &[Value::Str(&s)]).unwrap());
        let b = m.finish(0, 0, 0);
        assert_eq!(&b[HEADER_LEN + 4..HEADER_LEN + 7], &[255, 1, 44]);
        assert_eq!(b.len(), HEADER_LEN + 4 + 3 + 300);
    }

    /// A full message takes no more; values that do not fit their field
    /// are refused, naming it.
    #[test]
    fn limits_and_mismatches() {
        let t = template();
        let mut m = Message::new(100);
        let values = [
            Value::V4(Ipv4Addr::LOCALHOST),
            Value::U16(1),
            Value::U64(1),
            Value::Str("t"),
        ];
        let mut n = 0;
        while m.add_record(&t, &values).unwrap() {
            n += 1;
        }
        assert_eq!(n, 5, "(100 - 16 - 4) / 16 records");
        assert!(m.finish(0, 0, 0).len() <= 100);
        let mut m = Message::new(1400);
        let e = m
            .add_record(&t, &[Value::U16(1), Value::U16(1), Value::U64(1), Value::Str("")])
            .unwrap_err();
        assert!(e.to_string().contains("field 0 (element 8)"), "{e}");
        assert!(m.add_record(&t, &values[..2]).is_err());
        let big = "y".repeat(2000);
        let e = m.add_record(
            &t,
            &[
                values[0].clone(),
                values[1].clone(),
                values[2].clone(),
                Value::Str(&big),
            ],
        );
        assert!(matches!(e, Err(EncodeError::TooLarge(_))), "{e:?}");
        assert!(m.is_empty());
    }
}
