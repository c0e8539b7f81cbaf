//! Accepts the `protoc` arguments prost-build passes (`-I`/`--proto_path`,
//! `-o`/`--descriptor_set_out`, `--include_imports`,
//! `--include_source_info`, files) and writes the descriptor set with
//! protox.

use std::process::ExitCode;

use prost::Message;

fn main() -> ExitCode {
    let mut includes = Vec::new();
    let mut output = None;
    let mut files = Vec::new();
    let mut include_imports = false;
    let mut include_source_info = false;
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        if argument == "--version" {
            println!("libprotoc 3.21.12 (protox)");
            return ExitCode::SUCCESS;
        } else if argument == "-I" || argument == "--proto_path" {
            includes.extend(arguments.next());
        } else if let Some(path) = argument
            .strip_prefix("-I")
            .or_else(|| argument.strip_prefix("--proto_path="))
        {
            includes.push(path.to_string());
        } else if argument == "-o" || argument == "--descriptor_set_out" {
            output = arguments.next();
        } else if let Some(path) = argument
            .strip_prefix("-o")
            .or_else(|| argument.strip_prefix("--descriptor_set_out="))
        {
            output = Some(path.to_string());
        } else if argument == "--include_imports" {
            include_imports = true;
        } else if argument == "--include_source_info" {
            include_source_info = true;
        } else if argument.starts_with('-') {
            eprintln!("protoc-shim: unsupported argument {argument}");
            return ExitCode::FAILURE;
        } else {
            files.push(argument);
        }
    }
    let Some(output) = output else {
        eprintln!("protoc-shim: -o <file> is required");
        return ExitCode::FAILURE;
    };
    let result = protox::Compiler::new(includes).and_then(|mut compiler| {
        compiler.include_imports(include_imports);
        compiler.include_source_info(include_source_info);
        compiler.open_files(files)?;
        Ok(compiler.file_descriptor_set())
    });
    match result {
        Ok(set) => match std::fs::write(&output, set.encode_to_vec()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("protoc-shim: write {output}: {error}");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            eprintln!("protoc-shim: {error:?}");
            ExitCode::FAILURE
        }
    }
}
