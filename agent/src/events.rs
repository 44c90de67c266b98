//! What goes into a call and what comes out of it, independent of any wire protocol.

use crate::settings::SessionSettings;

/// Input from the transport to a call.
#[derive(Debug)]
pub enum CallInput {
    /// Caller audio, encoded in the session's input format (already base64-decoded).
    Audio(Vec<u8>),
    /// The client ends the caller's turn by hand (`input_audio_buffer.commit`).
    Commit,
    /// The client drops uncommitted audio (`input_audio_buffer.clear`).
    ClearInput,
    /// A typed user message (`conversation.item.create` with text).
    UserText(String),
    /// The client asks for a reply now (`response.create`).
    CreateResponse,
    /// `response.create` with options (per-response instructions, not interruptible).
    CreateResponseWith(crate::settings::ResponseOptions),
    /// The client says playback of an assistant item stopped at `audio_end_ms`
    /// (`conversation.item.truncate`): the item is cut to what was heard by then.
    Truncate { item_id: String, audio_end_ms: u64 },
    /// The client stops the reply in progress (`response.cancel`).
    CancelResponse,
    /// The server has the agent say these words now (a transfer's line, its failure):
    /// the reply in progress stops (kept as far as it was heard) and the words replace
    /// it in one step, so no reply the caller's turns were waiting for can start in
    /// between and refuse them. A turn waiting for an answer is answered after them.
    Say(crate::settings::ResponseOptions),
    /// New session settings (`session.update`), already merged and validated.
    Update(Box<SessionSettings>),
    /// The client's result for a client tool call (`function_call_output`).
    ToolOutput { call_id: String, output: String },
    /// The server ends the call with last words (it is shutting down): the reply in
    /// progress stops, the text is spoken through the call's voice and cannot be
    /// interrupted, and then the call ends by itself (its event stream closes). An
    /// empty text ends the call without a word.
    EndWith(String),
}

/// Why a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseStatus {
    /// It ran to the end.
    Completed,
    /// The client cancelled it or the caller barged in.
    Cancelled,
    /// A model failed; see the accompanying error event.
    Failed,
}

impl ResponseStatus {
    /// The Realtime protocol's name for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}

/// Stable error codes, so clients can react to a class of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A response is already in progress.
    ActiveResponse,
    /// Nothing to commit or answer.
    EmptyBuffer,
    /// Audio bytes that do not fit the input format.
    InvalidAudio,
    /// The caller's uncommitted audio exceeded the buffer limit.
    BufferFull,
    /// Speech-to-text failed for a turn.
    TranscriptionFailed,
    /// The language model or the voice failed.
    ModelFailed,
    /// A tool result for a call that does not exist or already has one.
    UnknownCall,
    /// An item id that names no item this request can apply to.
    UnknownItem,
}

impl ErrorCode {
    /// The code string sent to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ActiveResponse => "conversation_already_has_active_response",
            Self::EmptyBuffer => "input_audio_buffer_commit_empty",
            Self::InvalidAudio => "invalid_audio",
            Self::BufferFull => "input_audio_buffer_full",
            Self::TranscriptionFailed => "transcription_failed",
            Self::ModelFailed => "model_failed",
            Self::UnknownCall => "unknown_call_id",
            Self::UnknownItem => "item_not_found",
        }
    }
}

/// Where the time of one turn went, measured from the end of the caller's speech.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnMetrics {
    /// The response this turn produced.
    pub response_id: String,
    /// End of speech → turn committed (the VAD silence window).
    pub endpoint_ms: Option<f64>,
    /// End of speech → final transcript.
    pub transcript_ms: Option<f64>,
    /// Time the speech-to-text itself took.
    pub asr_ms: Option<f64>,
    /// End of speech → first LLM text.
    pub first_token_ms: Option<f64>,
    /// End of speech → first agent audio sent.
    pub first_audio_ms: Option<f64>,
    /// Prompt tokens, and how many of them came from the KV cache.
    pub prompt_tokens: usize,
    /// Tokens reused from the session's KV cache.
    pub cached_tokens: usize,
    /// Milliseconds the LLM spent on prefill.
    pub prefill_ms: f64,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time to synthesize the first phrase.
    pub first_tts_ms: Option<f64>,
}

/// Output from a call to its transport.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Settings in force (after start or an update).
    SessionUpdated(Box<SessionSettings>),
    /// The VAD heard the caller start speaking.
    SpeechStarted { item_id: String, audio_start_ms: u64 },
    /// The VAD heard the caller stop.
    SpeechStopped { item_id: String, audio_end_ms: u64 },
    /// A user audio item was committed to the conversation.
    InputCommitted { item_id: String, previous_item_id: Option<String> },
    /// The input buffer was cleared on the client's request.
    InputCleared,
    /// A conversation item was added (user text, user audio, assistant reply).
    ItemAdded { item_id: String, previous_item_id: Option<String>, role: crate::ItemRole, text: Option<String> },
    /// Newly stable text of the transcript of the user's speech in progress
    /// (append-only; the final transcript replaces it).
    UserTranscriptDelta { item_id: String, delta: String },
    /// The final transcript of a user audio item.
    UserTranscript { item_id: String, transcript: String },
    /// An assistant item was cut to what the caller heard (`conversation.item.truncate`).
    ItemTruncated { item_id: String, audio_end_ms: u64 },
    /// A response started.
    ResponseCreated { response_id: String },
    /// The response's assistant item.
    OutputItemAdded { response_id: String, item_id: String },
    /// A chunk of the agent's audio, encoded in the output format.
    AudioDelta { response_id: String, item_id: String, audio: Vec<u8> },
    /// Text of the agent's speech, sent as the matching audio starts.
    TranscriptDelta { response_id: String, item_id: String, delta: String },
    /// No more audio for this response item.
    AudioDone { response_id: String, item_id: String },
    /// The full text the agent spoke (cut to what was heard on interruption).
    TranscriptDone { response_id: String, item_id: String, transcript: String },
    /// The response ended.
    ResponseDone { response_id: String, item_id: Option<String>, status: ResponseStatus, transcript: String, function_calls: Vec<(String, parley_llm::ToolCall)> },
    /// The model called a tool. `client` calls are for the client to run and answer
    /// with a `function_call_output`; server calls are run here and reported.
    FunctionCall { response_id: String, item_id: String, previous_item_id: Option<String>, call: parley_llm::ToolCall, client: bool },
    /// A tool result was added to the conversation (server tools, or the client's).
    FunctionOutput { item_id: String, previous_item_id: Option<String>, call_id: String, output: String },
    /// The client must drop audio it has buffered (barge-in).
    OutputAudioCleared { response_id: String },
    /// Latency breakdown of a turn.
    Metrics(TurnMetrics),
    /// Something went wrong; the call goes on.
    Error { code: ErrorCode, message: String },
}
