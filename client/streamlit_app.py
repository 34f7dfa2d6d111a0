"""The BayLing demo page: chat and translation in the browser, streamed from a Triton server.

Start it with `bayling demo-ui --url localhost:8001`, or with Streamlit itself:

    streamlit run client/streamlit_app.py -- --url localhost:8001

The server address comes from `--url`/`--protocol` after `--`, else from the environment
(BAYLING_URL, BAYLING_PROTOCOL), else localhost:8001 over gRPC; it can be changed in the sidebar.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import streamlit as st

from bayling.client.library import BayLingClient, ModelInfo
from bayling.errors import BaylingError
from bayling.translation import LANGUAGE_NAMES, translation_prompt

TITLE = "BayLing 百聆"
TARGETS = {"en": "English", "zh": "中文 (Chinese)", "de": "Deutsch (German)", "fr": "Français (French)",
           "ja": "日本語 (Japanese)", "ru": "Русский (Russian)"}


def startup_settings() -> tuple[str, str | None]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--url")
    parser.add_argument("--protocol", choices=("grpc", "http"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return (args.url or os.environ.get("BAYLING_URL") or "localhost:8001",
            args.protocol or os.environ.get("BAYLING_PROTOCOL") or None)


@st.cache_resource(show_spinner=False)
def get_client(url: str, protocol: str | None) -> BayLingClient:
    return BayLingClient(url, protocol, timeout=600, retries=1)


def server_status(client: BayLingClient) -> tuple[bool, ModelInfo | None, str | None]:
    """(ready, model info, error) -- never raises."""
    try:
        ready = client.health()
        return ready, client.model_info() if ready else None, None if ready else "the server is not ready"
    except BaylingError as exc:
        return False, None, str(exc)


def sidebar() -> tuple[BayLingClient | None, dict, str]:
    default_url, default_protocol = startup_settings()
    with st.sidebar:
        st.header("Server")
        url = st.text_input("Server URL", value=default_url, help="host:port of gRPC, or http://host:port")
        client = None
        try:
            client = get_client(url.strip(), default_protocol if url.strip() == default_url else None)
        except BaylingError as exc:
            st.error(str(exc))
        ready, info, error = server_status(client) if client else (False, None, None)
        if ready and info:
            st.success("ready", icon="✅")
            st.markdown(f"**Model:** {info.model_name or 'unknown'}  \n**Engine:** {info.engine or 'unknown'}  \n"
                        f"**Template:** {info.template or 'unknown'}  \n"
                        f"**Context:** {info.max_context or '?'} tokens")
        elif client:
            st.error(f"not ready: {error}", icon="❌")
        st.header("Generation")
        context = info.max_context if info and info.max_context else 8192
        params = {
            "temperature": st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, help="0 is greedy"),
            "top_p": st.slider("Top p", 0.05, 1.0, 1.0, 0.05),
            "max_tokens": int(st.number_input("Max tokens", min_value=1, max_value=context,
                                              value=min(512, context // 2), step=16)),
        }
        system = st.text_area("System text", value="", placeholder="optional: how the assistant should behave")
        if st.button("Clear chat", width="stretch"):
            st.session_state.messages = []
    return client if ready else None, params, system.strip()


def pieces(stream):
    """The text pieces of a ChatStream; closing this generator (page rerun, stop) cancels on the server."""
    try:
        yield from stream
    finally:
        stream.close()


def chat_tab(client: BayLingClient | None, params: dict, system: str) -> None:
    messages: list[dict] = st.session_state.setdefault("messages", [])
    history = st.container()
    with history:
        for message in messages:
            with st.chat_message(message["role"]):
                st.markdown(message["content"])
    prompt = st.chat_input("Ask BayLing anything", disabled=client is None)
    if not prompt:
        return
    with history:
        with st.chat_message("user"):
            st.markdown(prompt)
        with st.chat_message("assistant"):
            conversation = ([{"role": "system", "content": system}] if system else []) + messages
            conversation = conversation + [{"role": "user", "content": prompt}]
            try:
                answer = st.write_stream(pieces(client.stream_chat(conversation, **params)))
            except BaylingError as exc:
                st.error(f"The server could not answer: {exc}")
                return
    answer = answer if isinstance(answer, str) else "".join(map(str, answer))
    if answer.strip():
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.strip()}]


def translate_tab(client: BayLingClient | None, params: dict) -> None:
    st.caption("One sentence per line, with the prompts of BayLing's translation script.")
    text = st.text_area("Sentences", height=150, key="translate_input")
    left, right = st.columns(2)
    target = left.selectbox("Target language", list(TARGETS), format_func=TARGETS.get, key="translate_target")
    instruction = right.radio("Instruction language", list(LANGUAGE_NAMES), horizontal=True,
                              format_func={"zh": "中文", "en": "English"}.get, key="translate_instruction")
    if st.button("Translate", type="primary", disabled=client is None or not text.strip()):
        lines = [line.strip() for line in text.splitlines() if line.strip()]

        def one(line: str) -> tuple[str, str | None]:
            try:
                prompt = translation_prompt(line, target, instruction)
                return client.chat(prompt, **{**params, "temperature": 0.0}).text.strip(), None
            except BaylingError as exc:
                return "", str(exc)

        with st.spinner(f"translating {len(lines)} line(s) ..."), ThreadPoolExecutor(4) as pool:
            st.session_state.translations = list(zip(lines, pool.map(one, lines)))
    for i, (source, (translation, error)) in enumerate(st.session_state.get("translations", []), 1):
        if error:
            st.error(f"line {i} ({source[:60]}): {error}")
        else:
            st.markdown(f"**{i}.** {source}  \n→ {translation}")


def main() -> None:
    st.set_page_config(page_title=TITLE, page_icon="💬", layout="wide")
    st.title(TITLE)
    client, params, system = sidebar()
    if client is None:
        st.warning("No server to talk to: check the server URL in the sidebar.")
    chat, translate = st.tabs(["Chat", "Translate"])
    with chat:
        chat_tab(client, params, system)
    with translate:
        translate_tab(client, params)


main()
