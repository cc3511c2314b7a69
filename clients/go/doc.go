// Package client holds the Go stubs of the clipsearch gRPC API (package clipsearchv1,
// generated from protos/ by scripts/gen_go_stubs.sh) and a test that drives a live server
// through them: other services call clipsearch exactly this way.
//
//	conn, _ := grpc.NewClient("127.0.0.1:50051",
//		grpc.WithTransportCredentials(insecure.NewCredentials()))
//	hits, err := clipsearchv1.NewSearchServiceClient(conn).Search(ctx,
//		&clipsearchv1.SearchRequest{Query: &clipsearchv1.SearchRequest_Text{Text: "a red circle"}, TopK: 5})
package client
