//! Lexer: query text → tokens, each with its 0-based character position.
//!
//! Token rules (Microsoft, "IoT Hub query language for device and module twins, jobs, and
//! message routing", section "Expressions and conditions"):
//! - Keywords (`SELECT`, `FROM`, `AND`, …) are case-insensitive. Function and aggregate names
//!   are plain identifiers; the parser recognises them by the `(` that follows.
//! - Identifiers: a letter, `_` or `$`, then letters, digits, `_` or `$` (so `$version` and
//!   `$metadata` are ordinary names).
//! - `[[name]]` is a bracketed name, the article's escape for names that collide with keywords
//!   (`tags.[[group]].name`). It is recognised only when the text up to `]]` holds no bracket,
//!   comma or quote, so a nested array constant such as `[[1, 2]]` still lexes as brackets.
//! - Numbers: decimal (`12`, `1.5`, `2e3`) or hexadecimal (`0x1F`). The sign is a separate
//!   `-` token; the parser folds `-5` into a constant.
//! - Strings: single or double quotes; escapes `\'`, `\"`, `\\`, `\uXXXX` as documented, plus
//!   the usual JSON escapes (`\/`, `\b`, `\f`, `\n`, `\r`, `\t`).

use super::QueryError;
use serde_json::Number;

/// Reserved words. Anything else that looks like a word is an [`TokenKind::Ident`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    Select,
    Top,
    From,
    Where,
    Group,
    By,
    As,
    And,
    Or,
    Not,
    In,
    Nin,
    True,
    False,
    Null,
    Undefined,
}

const KEYWORDS: &[(&str, Keyword)] = &[
    ("SELECT", Keyword::Select),
    ("TOP", Keyword::Top),
    ("FROM", Keyword::From),
    ("WHERE", Keyword::Where),
    ("GROUP", Keyword::Group),
    ("BY", Keyword::By),
    ("AS", Keyword::As),
    ("AND", Keyword::And),
    ("OR", Keyword::Or),
    ("NOT", Keyword::Not),
    ("IN", Keyword::In),
    ("NIN", Keyword::Nin),
    ("TRUE", Keyword::True),
    ("FALSE", Keyword::False),
    ("NULL", Keyword::Null),
    ("UNDEFINED", Keyword::Undefined),
];

#[derive(Debug, Clone, PartialEq)]
pub enum TokenKind {
    Keyword(Keyword),
    Ident(String),
    /// `[[name]]`.
    BracketIdent(String),
    Number(Number),
    Str(String),
    Star,
    Comma,
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Eq,
    /// `!=` or `<>`.
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Plus,
    Minus,
    Slash,
    Percent,
    Eof,
}

/// One token: its kind, where it starts (0-based, in characters) and its source text.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub kind: TokenKind,
    pub pos: usize,
    pub text: String,
}

impl Token {
    /// How error messages show this token: `'WHERE'`, `"text"`, or `end of query`.
    pub fn describe(&self) -> String {
        match self.kind {
            TokenKind::Eof => "end of query".to_owned(),
            // A string token's text already carries its quotes.
            TokenKind::Str(_) => self.text.clone(),
            _ => format!("'{}'", self.text),
        }
    }
}

/// Splits `text` into tokens, ending with one [`TokenKind::Eof`].
pub fn tokenize(text: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut lexer = Lexer { chars, pos: 0 };
    let mut out = Vec::new();
    loop {
        let token = lexer.next_token()?;
        let eof = token.kind == TokenKind::Eof;
        out.push(token);
        if eof {
            return Ok(out);
        }
    }
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

impl Lexer {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn text(&self, start: usize) -> String {
        self.chars[start..self.pos].iter().collect()
    }

    fn next_token(&mut self) -> Result<Token, QueryError> {
        while self.peek(0).is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(c) = self.peek(0) else {
            return Ok(Token {
                kind: TokenKind::Eof,
                pos: start,
                text: String::new(),
            });
        };
        let kind = match c {
            '\'' | '"' => self.string(c)?,
            '0'..='9' => self.number()?,
            c if is_ident_start(c) => {
                while self.peek(0).is_some_and(is_ident_char) {
                    self.pos += 1;
                }
                let word = self.text(start);
                match KEYWORDS.iter().find(|(k, _)| k.eq_ignore_ascii_case(&word)) {
                    Some(&(_, kw)) => TokenKind::Keyword(kw),
                    None => TokenKind::Ident(word),
                }
            }
            '[' if self.peek(1) == Some('[') => match self.bracket_name() {
                Some(name) => TokenKind::BracketIdent(name),
                None => self.single(TokenKind::LBracket),
            },
            '!' if self.peek(1) == Some('=') => self.double(TokenKind::Ne),
            '<' if self.peek(1) == Some('>') => self.double(TokenKind::Ne),
            '<' if self.peek(1) == Some('=') => self.double(TokenKind::Le),
            '>' if self.peek(1) == Some('=') => self.double(TokenKind::Ge),
            '<' => self.single(TokenKind::Lt),
            '>' => self.single(TokenKind::Gt),
            '=' => self.single(TokenKind::Eq),
            '*' => self.single(TokenKind::Star),
            ',' => self.single(TokenKind::Comma),
            '.' => self.single(TokenKind::Dot),
            '(' => self.single(TokenKind::LParen),
            ')' => self.single(TokenKind::RParen),
            '[' => self.single(TokenKind::LBracket),
            ']' => self.single(TokenKind::RBracket),
            '+' => self.single(TokenKind::Plus),
            '-' => self.single(TokenKind::Minus),
            '/' => self.single(TokenKind::Slash),
            '%' => self.single(TokenKind::Percent),
            other => {
                return Err(QueryError::new(
                    start,
                    format!("unexpected character '{}'", other.escape_debug()),
                ))
            }
        };
        Ok(Token {
            kind,
            pos: start,
            text: self.text(start),
        })
    }

    fn single(&mut self, kind: TokenKind) -> TokenKind {
        self.pos += 1;
        kind
    }

    fn double(&mut self, kind: TokenKind) -> TokenKind {
        self.pos += 2;
        kind
    }

    /// At `[[`: the name up to `]]`, consuming it, or `None` (nothing consumed) when this is
    /// not a bracketed name.
    fn bracket_name(&mut self) -> Option<String> {
        let mut end = self.pos + 2;
        loop {
            match self.chars.get(end)? {
                ']' if self.chars.get(end + 1) == Some(&']') => break,
                '[' | ']' | ',' | '\'' | '"' => return None,
                _ => end += 1,
            }
        }
        let name: String = self.chars[self.pos + 2..end].iter().collect();
        if name.trim().is_empty() {
            return None;
        }
        self.pos = end + 2;
        Some(name)
    }

    fn number(&mut self) -> Result<TokenKind, QueryError> {
        let start = self.pos;
        if self.peek(0) == Some('0') && matches!(self.peek(1), Some('x' | 'X')) {
            self.pos += 2;
            while self.peek(0).is_some_and(|c| c.is_ascii_hexdigit()) {
                self.pos += 1;
            }
            let digits = self.text(start + 2);
            return match i64::from_str_radix(&digits, 16) {
                Ok(n) => Ok(TokenKind::Number(n.into())),
                Err(_) => Err(QueryError::new(start, "invalid hexadecimal number")),
            };
        }
        let digits = |l: &mut Lexer| {
            while l.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                l.pos += 1;
            }
        };
        digits(self);
        let mut float = false;
        if self.peek(0) == Some('.') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            float = true;
            self.pos += 1;
            digits(self);
        }
        if matches!(self.peek(0), Some('e' | 'E')) {
            let sign = usize::from(matches!(self.peek(1), Some('+' | '-')));
            if self.peek(1 + sign).is_some_and(|c| c.is_ascii_digit()) {
                float = true;
                self.pos += 1 + sign;
                digits(self);
            }
        }
        if self.peek(0).is_some_and(is_ident_char) {
            return Err(QueryError::new(
                self.pos,
                format!("unexpected character '{}' in number", self.chars[self.pos]),
            ));
        }
        let text = self.text(start);
        if !float {
            if let Ok(n) = text.parse::<i64>() {
                return Ok(TokenKind::Number(n.into()));
            }
        }
        text.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(TokenKind::Number)
            .ok_or_else(|| QueryError::new(start, format!("invalid number '{text}'")))
    }

    fn string(&mut self, quote: char) -> Result<TokenKind, QueryError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek(0) else {
                return Err(QueryError::new(start, "unterminated string literal"));
            };
            self.pos += 1;
            if c == quote {
                return Ok(TokenKind::Str(out));
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let escape_at = self.pos - 1;
            let Some(e) = self.peek(0) else {
                return Err(QueryError::new(start, "unterminated string literal"));
            };
            self.pos += 1;
            match e {
                '\'' | '"' | '\\' | '/' => out.push(e),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'u' => out.push(self.unicode_escape(escape_at)?),
                other => {
                    return Err(QueryError::new(
                        escape_at,
                        format!("invalid escape sequence '\\{}'", other.escape_debug()),
                    ))
                }
            }
        }
    }

    /// After `\u`: four hex digits, combining a UTF-16 surrogate pair when one follows.
    fn unicode_escape(&mut self, escape_at: usize) -> Result<char, QueryError> {
        let bad = || QueryError::new(escape_at, "invalid \\u escape: expected 4 hex digits");
        let high = self.hex4().ok_or_else(bad)?;
        if (0xD800..0xDC00).contains(&high)
            && self.peek(0) == Some('\\')
            && self.peek(1) == Some('u')
        {
            let save = self.pos;
            self.pos += 2;
            match self.hex4() {
                Some(low) if (0xDC00..0xE000).contains(&low) => {
                    let c = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                    return char::from_u32(c).ok_or_else(bad);
                }
                _ => self.pos = save,
            }
        }
        char::from_u32(high)
            .ok_or_else(|| QueryError::new(escape_at, "invalid \\u escape: lone surrogate"))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits: String = self.chars.get(self.pos..self.pos + 4)?.iter().collect();
        if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        self.pos += 4;
        u32::from_str_radix(&digits, 16).ok()
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

#[cfg(test)]
mod tests {
    use super::*;
    use TokenKind as T;

    fn kinds(text: &str) -> Vec<TokenKind> {
        tokenize(text)
            .unwrap()
            .into_iter()
            .map(|t| t.kind)
            .collect()
    }

    fn ident(s: &str) -> TokenKind {
        T::Ident(s.into())
    }

    #[test]
    fn keywords_are_case_insensitive_and_keep_their_text() {
        let tokens = tokenize("select * From devices wHeRe").unwrap();
        assert_eq!(tokens[0].kind, T::Keyword(Keyword::Select));
        assert_eq!(tokens[0].text, "select");
        assert_eq!(tokens[1].kind, T::Star);
        assert_eq!(tokens[2].kind, T::Keyword(Keyword::From));
        assert_eq!(tokens[3].kind, ident("devices"));
        assert_eq!(tokens[4].kind, T::Keyword(Keyword::Where));
        assert_eq!(tokens[5].kind, T::Eof);
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let tokens = tokenize("'é€' = x").unwrap();
        assert_eq!(tokens[0].kind, T::Str("é€".into()));
        assert_eq!(
            tokens.iter().map(|t| t.pos).collect::<Vec<_>>(),
            vec![0, 5, 7, 8]
        );
    }

    #[test]
    fn dollar_names_and_paths() {
        assert_eq!(
            kinds("properties.reported.$version"),
            vec![
                ident("properties"),
                T::Dot,
                ident("reported"),
                T::Dot,
                ident("$version"),
                T::Eof
            ]
        );
    }

    #[test]
    fn operators() {
        assert_eq!(
            kinds("= != <> < > <= >= + - * / % ( ) [ ] ,"),
            vec![
                T::Eq,
                T::Ne,
                T::Ne,
                T::Lt,
                T::Gt,
                T::Le,
                T::Ge,
                T::Plus,
                T::Minus,
                T::Star,
                T::Slash,
                T::Percent,
                T::LParen,
                T::RParen,
                T::LBracket,
                T::RBracket,
                T::Comma,
                T::Eof
            ]
        );
        assert_eq!(
            kinds("a>=1"),
            vec![ident("a"), T::Ge, T::Number(1.into()), T::Eof]
        );
    }

    #[test]
    fn numbers_decimal_float_exponent_hex() {
        let n = |v: f64| T::Number(Number::from_f64(v).unwrap());
        assert_eq!(kinds("60")[0], T::Number(60.into()));
        assert_eq!(kinds("1.5")[0], n(1.5));
        assert_eq!(kinds("2e3")[0], n(2000.0));
        assert_eq!(kinds("2.5E-1")[0], n(0.25));
        assert_eq!(kinds("0x1F")[0], T::Number(31.into()));
        assert_eq!(kinds("-7"), vec![T::Minus, T::Number(7.into()), T::Eof]);
        assert_eq!(kinds("99999999999999999999")[0], n(1e20));
        assert!(tokenize("0x").is_err());
        assert!(tokenize("12abc").is_err());
    }

    #[test]
    fn strings_with_both_quotes_and_escapes() {
        assert_eq!(kinds("'US'")[0], T::Str("US".into()));
        assert_eq!(kinds("\"US\"")[0], T::Str("US".into()));
        assert_eq!(kinds(r#"'it\'s'"#)[0], T::Str("it's".into()));
        assert_eq!(kinds(r#""say \"hi\"""#)[0], T::Str("say \"hi\"".into()));
        assert_eq!(kinds(r"'a\\b'")[0], T::Str("a\\b".into()));
        assert_eq!(kinds(r"'\u00e9'")[0], T::Str("é".into()));
        assert_eq!(kinds(r"'\ud83d\ude00'")[0], T::Str("😀".into()));
        assert_eq!(kinds("'say \"hi\"'")[0], T::Str("say \"hi\"".into()));
    }

    #[test]
    fn string_errors_point_at_the_problem() {
        let err = tokenize("x = 'open").unwrap_err();
        assert_eq!(err.position, 4);
        assert!(err.message.contains("unterminated"));
        assert_eq!(tokenize(r"'a\qb'").unwrap_err().position, 2);
        assert_eq!(tokenize(r"'\u12'").unwrap_err().position, 1);
        assert!(tokenize(r"'\ud800'").is_err());
        assert!(tokenize("'\\").is_err());
    }

    #[test]
    fn bracketed_names() {
        assert_eq!(
            kinds("tags.[[group]].name"),
            vec![
                ident("tags"),
                T::Dot,
                T::BracketIdent("group".into()),
                T::Dot,
                ident("name"),
                T::Eof
            ]
        );
        // A nested array constant is not a bracketed name.
        assert_eq!(kinds("[[1, 2]]")[..2], [T::LBracket, T::LBracket]);
        assert_eq!(kinds("[['a']]")[..2], [T::LBracket, T::LBracket]);
    }

    #[test]
    fn unexpected_characters_are_errors_with_positions() {
        let err = tokenize("SELECT # FROM devices").unwrap_err();
        assert_eq!(err.position, 7);
        assert!(err.message.contains("'#'"), "{}", err.message);
        assert_eq!(tokenize("a ! b").unwrap_err().position, 2);
        assert_eq!(tokenize("a == b").unwrap()[2].kind, T::Eq);
    }

    #[test]
    fn describe_tokens_for_messages() {
        let tokens = tokenize("WHERE \"s\" 's'").unwrap();
        assert_eq!(tokens[0].describe(), "'WHERE'");
        assert_eq!(tokens[1].describe(), "\"s\"");
        assert_eq!(tokens[2].describe(), "'s'");
        assert_eq!(tokens[3].describe(), "end of query");
    }
}
