package tinker

// The Go types of Tinker's protobuf wire, generated from proto/tinker_public.proto
// with protoc (Debian's protobuf-compiler) and protoc-gen-go at the module's
// google.golang.org/protobuf version (go install
// google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12).
//go:generate protoc --proto_path=proto --go_out=tinkerpb --go_opt=paths=source_relative tinker_public.proto
