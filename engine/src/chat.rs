//! Chat templates: the model's own Jinja template when it ships one, else ChatML or Llama 3.

use minijinja::{Environment, context};
use serde::Serialize;

use crate::EngineError;

/// One chat message.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

impl Message {
    /// A user message.
    pub fn user(content: &str) -> Self {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A chat template.
#[derive(Clone, Debug)]
pub enum ChatTemplate {
    /// A Jinja template from the model's metadata, with its BOS/EOS token strings.
    Jinja {
        /// Template source.
        source: String,
        /// `bos_token` as the template sees it.
        bos: String,
        /// `eos_token` as the template sees it.
        eos: String,
    },
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
}

impl ChatTemplate {
    /// Renders `messages` with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String, EngineError> {
        match self {
            ChatTemplate::Jinja { source, bos, eos } => {
                let mut env = Environment::new();
                minijinja_contrib::add_to_environment(&mut env);
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |msg: String| -> Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            msg,
                        ))
                    },
                );
                env.add_template("chat", source)
                    .map_err(|e| EngineError::Format(format!("chat template: {e}")))?;
                env.get_template("chat")
                    .and_then(|t| {
                        t.render(
                            context! { messages => messages, add_generation_prompt => true,
                            bos_token => bos, eos_token => eos },
                        )
                    })
                    .map_err(|e| EngineError::BadRequest(format!("chat template: {e}")))
            }
            ChatTemplate::ChatMl => {
                let mut s = String::new();
                for m in messages {
                    s.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role, m.content
                    ));
                }
                s.push_str("<|im_start|>assistant\n");
                Ok(s)
            }
            ChatTemplate::Llama3 => {
                let mut s = String::from("<|begin_of_text|>");
                for m in messages {
                    s.push_str(&format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role,
                        m.content.trim()
                    ));
                }
                s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                Ok(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_render_the_expected_markers() {
        let m = [Message::user("Hi")];
        assert_eq!(
            ChatTemplate::ChatMl.render(&m).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(
            ChatTemplate::Llama3
                .render(&m)
                .unwrap()
                .ends_with("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        );
    }

    #[test]
    fn jinja_templates_render_and_report_errors() {
        let t = ChatTemplate::Jinja {
            source: "{% for m in messages %}[{{ m.role }}]{{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}".into(),
            bos: "<s>".into(),
            eos: "</s>".into(),
        };
        assert_eq!(
            t.render(&[Message::user("  Hi ")]).unwrap(),
            "[user]Hi[assistant]"
        );
        let bad = ChatTemplate::Jinja {
            source: "{{ raise_exception('no system role') }}".into(),
            bos: String::new(),
            eos: String::new(),
        };
        assert!(
            matches!(bad.render(&[]), Err(EngineError::BadRequest(m)) if m.contains("no system role"))
        );
    }
}
