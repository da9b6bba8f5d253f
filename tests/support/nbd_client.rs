//! A raw NBD client for the tests: it says exactly what a test wants,
//! hostile input included, and reads the server's answers as they are.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;
pub const MIB: u64 = 1 << 20;

/// A connection in the option phase.
pub struct Haggle(pub TcpStream);

impl Haggle {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::try_connect(addr)
            .await
            .unwrap_or_else(|e| panic!("NBD handshake with {addr}: {e}"))
    }

    /// [`connect`](Self::connect), or why it failed.
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<Self> {
        let mut stream = TcpStream::connect(addr).await?;
        let greeting = (
            stream.read_u64().await?,
            stream.read_u64().await?,
            stream.read_u16().await?,
        );
        if greeting != (0x4e42_444d_4147_4943, IHAVEOPT, 0b11) {
            return Err(std::io::Error::other(format!("greeting {greeting:x?}")));
        }
        stream.write_u32(0b11).await?;
        Ok(Self(stream))
    }

    pub async fn send(&mut self, option: u32, data: &[u8]) {
        self.try_send(option, data).await.unwrap();
    }

    async fn try_send(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        self.0.write_u64(IHAVEOPT).await?;
        self.0.write_u32(option).await?;
        self.0.write_u32(data.len() as u32).await?;
        self.0.write_all(data).await
    }

    /// Every reply to `option` up to the final one (ACK or an error).
    pub async fn ask(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.try_ask(option, data).await.unwrap()
    }

    /// [`ask`](Self::ask), or why it failed.
    pub async fn try_ask(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> std::io::Result<Vec<(u32, Vec<u8>)>> {
        self.try_send(option, data).await?;
        let mut replies = Vec::new();
        loop {
            let (magic, answered) = (self.0.read_u64().await?, self.0.read_u32().await?);
            if (magic, answered) != (REPLY_MAGIC, option) {
                return Err(std::io::Error::other(format!(
                    "reply {magic:#x} to option {answered}, not {option}"
                )));
            }
            let kind = self.0.read_u32().await?;
            let mut data = vec![0; self.0.read_u32().await? as usize];
            self.0.read_exact(&mut data).await?;
            replies.push((kind, data));
            if kind != REP_SERVER && kind != REP_INFO {
                return Ok(replies);
            }
        }
    }

    /// Goes into transmission on `export`.
    pub async fn go(mut self, export: &str) -> Client {
        let replies = self.ask(OPT_GO, &info_request(export, &[3])).await;
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        Client(self.0)
    }

    /// Whether the server closed the connection (reads EOF soon).
    pub async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.0.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// [`connect`](Self::connect) and [`go`](Self::go) to `export`, or
    /// `None` where either failed (nobody listens, the server closed, the
    /// export is refused): for a client looking for whoever serves it.
    pub async fn try_open(addr: SocketAddr, export: &str) -> Option<Client> {
        let mut haggle = Self::try_connect(addr).await.ok()?;
        let replies = haggle
            .try_ask(OPT_GO, &info_request(export, &[3]))
            .await
            .ok()?;
        (replies.last()?.0 == REP_ACK).then_some(Client(haggle.0))
    }
}

pub fn info_request(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

/// A connection in transmission.
pub struct Client(pub TcpStream);

impl Client {
    pub async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        data: &[u8],
    ) {
        let mut header = Vec::with_capacity(28 + data.len());
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&kind.to_be_bytes());
        header.extend_from_slice(&handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(data);
        self.0.write_all(&header).await.unwrap();
    }

    /// The next reply: (error, handle).
    pub async fn reply(&mut self) -> (u32, u64) {
        let magic = tokio::time::timeout(Duration::from_secs(10), self.0.read_u32())
            .await
            .expect("a reply within 10 s")
            .unwrap();
        assert_eq!(magic, SIMPLE_REPLY_MAGIC);
        let error = self.0.read_u32().await.unwrap();
        (error, self.0.read_u64().await.unwrap())
    }

    /// One request and its reply's error.
    pub async fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> u32 {
        self.send(kind, flags, 7, offset, length, data).await;
        let (error, handle) = self.reply().await;
        assert_eq!(handle, 7);
        error
    }

    /// A write and its reply's error; `None` when the connection failed
    /// instead (the server closed it).
    pub async fn try_write(&mut self, offset: u64, data: &[u8], flags: u16) -> Option<u32> {
        let mut request = Vec::with_capacity(28 + data.len());
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&flags.to_be_bytes());
        request.extend_from_slice(&CMD_WRITE.to_be_bytes());
        request.extend_from_slice(&7u64.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&(data.len() as u32).to_be_bytes());
        request.extend_from_slice(data);
        self.0.write_all(&request).await.ok()?;
        let mut reply = [0u8; 16];
        self.0.read_exact(&mut reply).await.ok()?;
        assert_eq!(&reply[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&reply[8..], &7u64.to_be_bytes());
        Some(u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]))
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data)
            .await
    }

    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        match self.call(CMD_READ, 0, offset, length, &[]).await {
            0 => {
                let mut data = vec![0; length as usize];
                self.0.read_exact(&mut data).await.unwrap();
                Ok(data)
            }
            error => Err(error),
        }
    }

    pub async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.0.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}
