// Runs once, when the MongoDB container initialises its data directory (mongosh, as the root
// user of MONGO_INITDB_ROOT_USERNAME, which also turns authorization on).
// The query service connects as cqrs_query: readWrite on the `cqrs` database only, so it can
// project, build indexes and drop its retired generations there, and nothing anywhere else
// (no other database, no dropDatabase, no users). cqrs_reader may only read `cqrs`: for an
// API-only replica (CQRS_RUN_PROJECTOR=false) that starts no rebuilds, or for reporting.
const cqrs = db.getSiblingDB("cqrs");
cqrs.createUser({
  user: "cqrs_query",
  pwd: process.env.CQRS_MONGO_QUERY_PASSWORD,
  roles: [{ role: "readWrite", db: "cqrs" }],
});
cqrs.createUser({
  user: "cqrs_reader",
  pwd: process.env.CQRS_MONGO_READER_PASSWORD,
  roles: [{ role: "read", db: "cqrs" }],
});
