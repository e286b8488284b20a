//! Chat prompts: messages rendered with the model's own Jinja chat template
//! (`tokenizer.chat_template` in the GGUF metadata), as Hugging Face renders it:
//! `messages`, `add_generation_prompt = true`, `bos_token`, `eos_token`, and
//! `raise_exception` for templates that validate their input, and Python's
//! string and list methods (`startswith`, `split`, `strip`, ...), which
//! templates written for transformers' Jinja call (Qwen 3's does on every
//! message), through minijinja-contrib's `pycompat`.

use minijinja::{Environment, Error, ErrorKind};
use rbee_schemas::job::ChatMessage;

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| format!("the model's chat template does not compile: {e}"))?;
        Ok(Self { env, bos: bos.to_owned(), eos: eos.to_owned() })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opening.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let msgs: Vec<_> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        template
            .render(minijinja::context! {
                messages => msgs,
                add_generation_prompt => true,
                bos_token => self.bos.as_str(),
                eos_token => self.eos.as_str(),
            })
            .map_err(|e| format!("rendering the chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage { role: "user".into(), content: "Hi".into() }]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// The parts of Qwen 3's template that call Python methods: finding the
    /// last real user turn, and cutting the thinking out of an answer.
    #[test]
    fn python_string_methods_work_as_in_transformers() {
        let src = "{%- set ns = namespace(last=messages|length - 1) %}\
            {%- for m in messages[::-1] %}{%- set i = (messages|length - 1) - loop.index0 %}\
            {%- if m.role == 'user' and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) and ns.last == messages|length - 1 %}{%- set ns.last = i %}{%- endif %}{%- endfor %}\
            {%- for m in messages %}{%- if m.role == 'assistant' and '</think>' in m.content %}\
            {{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}\
            {%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content.strip() + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}\
            {{- 'last user turn: ' ~ ns.last }}";
        let t = ChatTemplate::new(src, "", "<|im_end|>").unwrap();
        let msg = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
        let out = t
            .render(&[
                msg("user", " Hi "),
                msg("assistant", "<think>\nhm\n</think>\n\nHello"),
                msg("user", "<tool_response>42</tool_response>"),
            ])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n\
             <|im_start|>user\n<tool_response>42</tool_response><|im_end|>\nlast user turn: 0"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t.render(&[]).unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
    }
}
