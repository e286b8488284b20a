//! Chat prompts: messages rendered with the model's own Jinja chat template
//! (`tokenizer.chat_template` in the GGUF metadata), as Hugging Face renders it:
//! `messages`, `add_generation_prompt = true`, `bos_token`, `eos_token`, and
//! `raise_exception` for templates that validate their input, and Python's
//! string and list methods (`startswith`, `split`, `strip`, ...), which
//! templates written for transformers' Jinja call (Qwen 3's does on every
//! message), through minijinja-contrib's `pycompat`; and transformers'
//! `strftime_now` (Llama 3.1+ put today's date in the system turn).

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

/// transformers' `strftime_now(format)`: the current time (UTC here) in
/// Python's `strftime` format.
fn strftime_now(format: String) -> Result<String, Error> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    strftime(&format, now.as_secs() as i64)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// `format` at `unix` seconds, UTC: the directives templates use (`%d %b %Y`,
/// `%Y-%m-%d`, names of months and days, the time of day, `%%`).
fn strftime(format: &str, unix: i64) -> Result<String, Error> {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let (mut out, mut chars) = (String::new(), format.chars());
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[month as usize - 1];
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3_600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: %{} is not supported", other.map(String::from).unwrap_or_default()),
                ))
            }
        }
    }
    Ok(out)
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
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
    fn strftime_formats_dates_as_python_does() {
        // 2024-07-26 (a Friday) 13:25:09 UTC, and days either side of leap days.
        assert_eq!(strftime("%d %b %Y", 1_722_000_309).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %A %a %B %y %%", 1_722_000_309).unwrap(), "2024-07-26 13:25:09 Friday Fri July 24 %");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert_eq!(strftime("%Y-%m-%d %A", 0).unwrap(), "1970-01-01 Thursday");
        assert_eq!(strftime("%Y-%m-%d", 4_107_542_399).unwrap(), "2100-02-28");
        assert!(strftime("%Q", 0).is_err());
        // As Llama 3.2's template calls it.
        let t = ChatTemplate::new(
            "{%- if strftime_now is defined %}{%- set d = strftime_now('%d %b %Y') %}{%- else %}{%- set d = '26 Jul 2024' %}{%- endif %}Today Date: {{ d }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[]).unwrap(), format!("Today Date: {}", strftime_now("%d %b %Y".into()).unwrap()));
    }

    /// Gemma 3's template (from its `tokenizer_config.json`, as its GGUF
    /// files carry it): the system prompt folded into the first user turn,
    /// the assistant called `model`, roles checked to alternate.
    const GEMMA3: &str = "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n";

    #[test]
    fn gemma3_template_renders_like_transformers() {
        let t = ChatTemplate::new(GEMMA3, "<bos>", "<eos>").unwrap();
        let msg = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
        let out = t.render(&[msg("system", "Be brief."), msg("user", " Hi "), msg("assistant", "Hello."), msg("user", "Why?")]).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
        );
        let e = t.render(&[msg("user", "a"), msg("user", "b")]).unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t.render(&[]).unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
    }
}
