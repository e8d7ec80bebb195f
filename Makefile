.PHONY: test protos

# The test command the README names: installs what it needs, then runs the suite.
test:
	bash scripts/test.sh

# grpcio-tools 1.84.0 matches the GPU hosts' grpcio; a newer one makes stubs they refuse.
# The -I mapping makes the generated imports read `from shared.proto import ...`.
protos:
	python3 -m grpc_tools.protoc -Ishared/proto=protos --python_out=. --pyi_out=. \
		--grpc_python_out=. protos/generation.proto protos/stage_worker.proto
